"""Kubeflow pipelines of the platform: `pipelines.cladapter_pipeline`."""
