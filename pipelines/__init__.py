"""Kubeflow pipelines of the platform: `pipelines.cladapter_pipeline`; `pipelines.cli`, the
`cladapter pipeline` subcommand (a `cladapter.commands` entry point)."""
