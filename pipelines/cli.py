"""`cladapter pipeline compile|submit|run-local`: the Kubeflow pipeline's subcommand.

The `cladapter` command (cladapter_core.cli) knows nothing of KFP: it finds this
subcommand through the `cladapter.commands` entry point that pyproject.toml declares,
`pipeline = "pipelines.cli:register"`, and calls `register(subparsers)`, which adds the
`pipeline` parser and returns its handler. kfp is imported only when the command runs,
so `cladapter --help` and the other commands never load it.
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction):
    """Add the `pipeline` subcommand to the `cladapter` parser; return its handler."""
    p = sub.add_parser("pipeline", help="Kubeflow pipeline: compile, submit, run-local",
                       description="The KFP pipeline (pipelines/cladapter_pipeline.py): compile it "
                                   "to the YAML a user uploads in the KFP UI, submit a run to a KFP "
                                   "API, or run it on this machine with kfp.local.")
    act = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_compile(act)
    _add_submit(act)
    _add_run_local(act)
    return cmd_pipeline


def _add_compile(act) -> None:
    q = act.add_parser("compile", help="write pipelines/cladapter_pipeline.yaml",
                       description="Compile the pipeline; the image is $CLADAPTER_IMAGE "
                                   "(default ghcr.io/cladapter/cladapter:0.1.0).")
    q.add_argument("--out", help="output file (default: pipelines/cladapter_pipeline.yaml)")
    q.add_argument("--params", metavar="FILE",
                   help="params file the parameters' defaults (and every other field) come from "
                        "(default: pipelines/params/production.yaml; the demo: pipelines/params/demo.yaml)")
    q.add_argument("--train-gpus", type=int, default=1,
                   help="GPUs per training step, one node (> 1: DDP through torchrun; default 1)")
    q.add_argument("--scratch-size", default="100Gi",
                   help="ephemeral volume of the steps that copy data locally (default 100Gi)")


def _add_submit(act) -> None:
    q = act.add_parser("submit", help="start a run on a KFP API (kfp.Client)")
    q.add_argument("--host", required=True, help="KFP API, e.g. http://localhost:8080 (port-forward)")
    q.add_argument("--experiment", default="cladapter", help="KFP experiment (default: cladapter)")
    q.add_argument("--run-name", help="run name shown in the UI")
    q.add_argument("-p", "--param", dest="arguments", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline parameter, e.g. -p dataset_uri=s3://data/pets -p num_centers=10")
    q.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
    q.add_argument("--service-account", default="cladapter-pipeline-runner",
                   help="service account of the run's pods (default: cladapter-pipeline-runner, which "
                        "both install overlays, standalone and multi-user, create where the runs "
                        "start; \"\": the namespace's KFP default, pipeline-runner or default-editor)")
    q.add_argument("--params", metavar="FILE", help="as for compile (ignored with --package)")
    q.add_argument("--no-cache", action="store_true", help="run every step, even cached ones")
    q.add_argument("--package", help="a compiled pipeline YAML to submit (default: compile now)")
    q.add_argument("--train-gpus", type=int, default=1, help="as for compile (ignored with --package)")


def _add_run_local(act) -> None:
    q = act.add_parser("run-local", help="run the pipeline on this machine with kfp.local",
                       description="Every step runs as a subprocess in this Python environment "
                                   "(Kubernetes settings are ignored); the demo data unless "
                                   "-p dataset_uri=... says otherwise. MLflow: $MLFLOW_TRACKING_URI.")
    q.add_argument("--out", default="outputs/kfp-local", help="output root (default: outputs/kfp-local)")
    q.add_argument("--params", metavar="FILE", default=None,
                   help="params file of the defaults (default: pipelines/params/demo.yaml)")
    q.add_argument("-p", "--param", dest="arguments", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline parameter, e.g. -p stage1_epochs=2")


def cmd_pipeline(args) -> None:
    # Imported here: kfp is needed only by this command.
    from pipelines import cladapter_pipeline as kp
    if args.action == "compile":
        out = kp.compile_pipeline(args.out or kp.PIPELINE_FILE, train_gpus=args.train_gpus,
                                  params_file=args.params, scratch_size=args.scratch_size)
        print(f"compiled {kp.PIPELINE_NAME} -> {out} (image {kp.stages.IMAGE}, defaults from "
              f"{args.params or kp.PRODUCTION_PARAMS}; KFP backend >= {kp.OLDEST_KFP_BACKEND}); "
              "upload it in the KFP UI")
    elif args.action == "submit":
        run_id = kp.submit(args.host, kp.parse_arguments(args.arguments), experiment=args.experiment,
                           run_name=args.run_name, namespace=args.namespace,
                           service_account=args.service_account,
                           enable_caching=False if args.no_cache else None, package=args.package,
                           train_gpus=args.train_gpus, params_file=args.params)
        print(f"submitted run {run_id} to {args.host} (experiment {args.experiment})")
    else:
        run_dir = kp.run_local(args.out, kp.parse_arguments(args.arguments),
                               params_file=args.params or kp.DEMO_PARAMS)
        print(f"local run finished: outputs in {run_dir}")
