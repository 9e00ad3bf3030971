"""Kubeflow Pipelines v2 components: one per stage, each mapping its kfp inputs and outputs to
one `canao` call (components/runtime.py). All run in the one canao image."""
