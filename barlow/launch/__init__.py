"""Who starts torchrun: this machine (`local`), or Kubernetes (`render` renders the manifests, `cluster` talks to the
API: submits and watches)."""
