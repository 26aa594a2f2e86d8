"""barlow: Barlow Twins self-supervised pretraining, from one laptop to a Kubernetes cluster."""

__version__ = "0.1.0"
