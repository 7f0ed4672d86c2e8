"""Kubeflow Pipelines components: one per stage, each a thin shell over cladapter_core.

`components.stages` holds the KFP component definitions (lightweight Python components
that run in the project image, `cladapter_core.settings` `image`, $CLADAPTER_IMAGE); `components.runtime`
holds what their bodies call: pipeline parameters -> params, fetching a dataset, MLflow
stage runs, the checkpoint that survives a retried pod, torchrun for several GPUs.
"""
