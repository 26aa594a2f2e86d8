"""Who starts torchrun: this machine (`local`), or Kubernetes (`kubernetes` renders, `cluster` submits and watches)."""
