"""The KFP v2 components, one per stage. Each is a lightweight Python component that runs
in the project image (`settings().image`, $CLADAPTER_IMAGE, which has kfp and this package:
nothing is pip-installed at run time; the steps that do not train in its light variant,
`LIGHT_STEPS`) and whose body only turns KFP artifacts into paths
and calls `components.runtime`, which calls `cladapter_core`.

KFP serialises each function's source, so the bodies import what they use.
`pipeline_id` / `pipeline_name` are the KFP run's id and name (placeholders the backend
fills in): the MLflow parent run is found by the id and named after the name.
"""

import linecache
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from cladapter_core.settings import settings
from components.pipeline_params import params_step_inputs

# No `from __future__ import annotations` here: KFP reads the real annotation types.
# install_kfp_package=False: the image has kfp; its pods run offline and non-root.
IMAGE = settings().image  # $CLADAPTER_IMAGE where the pipeline is compiled
_IN_IMAGE = dict(base_image=IMAGE, install_kfp_package=False)
# The steps that do not train run in the light image (no torch, no CUDA wheels: a cold
# start pulls far less); what they import must load without torch (tests/test_light_image.py).
LIGHT_IMAGE = settings().light_image  # $CLADAPTER_LIGHT_IMAGE, else <image>-light
LIGHT_STEPS = ("resolve_params", "dataset_version", "tune_plan", "untuned", "close_pipeline_run")
_IN_LIGHT_IMAGE = dict(base_image=LIGHT_IMAGE, install_kfp_package=False)


# The params step's inputs are the pipeline parameters that reach the params
# (components.pipeline_params.PIPELINE_PARAMS): its source is written from that table, so
# the function KFP serialises into the YAML, and runs in the pod, has one argument per
# parameter (KFP's executor passes inputs by the function's own argument names).
_RESOLVE_SOURCE = '''def resolve_params(base_params: str, {args},
) -> NamedTuple("ResolvedParams", [("params", str), ("data_params", str)]):
    """The params file the pipeline was compiled from (`base_params`), then the run's
    parameters -> the full, validated params (JSON); every problem at once."""
    import json

    from components import runtime
    runtime.start_step()
    values = dict({names})
    params = runtime.resolve_params(values, values.pop("params_overrides"), base=json.loads(base_params))
    print(json.dumps(params, indent=2, sort_keys=True))
    return (json.dumps(params, sort_keys=True), json.dumps(runtime.data_part(params), sort_keys=True))
'''


def _generated(name: str, source: str):
    """The function `name` defined by `source`, whose source inspect.getsource (and so KFP)
    can read: the text is registered in linecache under a name of its own."""
    filename = f"<generated {__name__}.{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"NamedTuple": NamedTuple, "__name__": __name__}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 (our own table's text)
    func = namespace[name]
    func.__module__ = __name__
    return func


def _resolve_params_source() -> str:
    inputs = params_step_inputs()
    if "params_overrides" not in dict(inputs):
        raise TypeError("PIPELINE_PARAMS: params_overrides must reach the params step")
    return _RESOLVE_SOURCE.format(args=", ".join(f"{n}: {t.__name__}" for n, t in inputs),
                                  names=", ".join(f"{n}={n}" for n, _ in inputs))


def make_resolve_params():
    """The params step's component, from the table as it is now (the pipeline builds it)."""
    return dsl.component(**_IN_LIGHT_IMAGE)(_generated("resolve_params", _resolve_params_source()))



@dsl.component(**_IN_LIGHT_IMAGE)
def dataset_version(dataset_uri: str, dataset_path: str, dataset_rev: str) -> str:
    """The data's version before it is read (never cached): a DVC revision's commit SHA,
    the hash of an S3 prefix's listing (names and ETags). An input of prepare, so a
    changed dataset never hits prepare's old cache entry."""
    from components import runtime
    runtime.start_step()
    version = runtime.data_version(dataset_uri, dataset_path, dataset_rev)
    print(f"data version: {version}")
    return version


@dsl.component(**_IN_IMAGE)
def prepare(dataset_uri: str, dataset_path: str, dataset_rev: str, data_version: str,
            data_params: str, dataset: Output[Dataset]) -> str:
    """Validate and split the dataset; the artifact holds the manifest, classes, summary
    and a reference to the files (not a copy). Returns the data hash. `data_version`:
    what the data must still be (the cache key's part that changes with the data)."""
    from components import runtime
    runtime.start_step()
    params = runtime.params_from_json(data_params)
    summary = runtime.prepare_task(dataset_uri, dataset_path, dataset_rev, params, dataset.path,
                                   data_version=data_version)
    dataset.metadata.update(runtime.dataset_metadata(dataset.path, summary))
    from cladapter_core import identity
    return identity.data_hash(runtime.artifact_prepared(dataset.path))


@dsl.component(**_IN_LIGHT_IMAGE)
def tune_plan(params: str, n_trials: int, n_workers: int, pipeline_id: str) -> List[int]:
    """Check the search (space, shared study storage) and create the study; returns the
    workers' indices, over which the pipeline fans out."""
    from components import runtime
    runtime.start_step()
    return runtime.tune_plan_task(runtime.params_from_json(params), n_trials, n_workers, pipeline_id)


@dsl.component(**_IN_IMAGE)
def tune_worker(params: str, dataset: Input[Dataset], worker_index: int, n_trials: int,
                n_workers: int, pipeline_id: str, pipeline_name: str, data_hash: str,
                metrics: Output[Metrics]):
    """One worker of the search: its share of the trials on the run's shared study."""
    from components import runtime
    runtime.start_step()
    done = runtime.tune_worker_task(runtime.params_from_json(params), dataset.path, worker_index,
                                    n_trials, n_workers, pipeline_id, pipeline_name, data_hash)
    for key in ("complete", "pruned", "failed", "epochs"):
        metrics.log_metric(key, float(done[key]))


@dsl.component(**_IN_IMAGE)
def tune_finish(params: str, dataset: Input[Dataset], pipeline_id: str, pipeline_name: str,
                tuning: Output[Artifact], metrics: Output[Metrics]) -> str:
    """The study's results (best_params.yaml, trials, figures), the best trials re-run on
    other seeds first (tune.rerun_top); returns the params to train with: the chosen
    trial's values applied."""
    import json

    from components import runtime
    runtime.start_step()
    tuned, summary = runtime.tune_finish_task(runtime.params_from_json(params), tuning.path,
                                              pipeline_id, pipeline_name, dataset.path)
    metrics.log_metric("best_val_macro_f1", float(summary["best_value"]))
    for key in ("n_trials", "complete", "pruned", "failed"):
        metrics.log_metric(key, float(summary[key]))
    tuning.metadata.update({"best_params": summary["best_params"], "study": summary["study_name"]})
    return json.dumps(tuned, sort_keys=True)


@dsl.component(**_IN_LIGHT_IMAGE)
def untuned(params: str) -> str:
    """Tuning off: the params, unchanged (the other branch of the tuning condition)."""
    import json

    from components import runtime
    runtime.start_step()
    return json.dumps(runtime.params_from_json(params), sort_keys=True)


@dsl.component(**_IN_IMAGE)
def train_stage1(params: str, dataset: Input[Dataset], pipeline_id: str, pipeline_name: str,
                 data_hash: str, checkpoint_prefix: str, num_gpus: int, model: Output[Model],
                 metrics: Output[Metrics]):
    """Stage 1: backbone frozen, adapter + head trained."""
    from components import runtime
    runtime.start_step()
    p = runtime.params_from_json(params)
    summary = runtime.train_task(p, dataset.path, model.path, stage=1, pipeline_id=pipeline_id,
                                 checkpoint_prefix=checkpoint_prefix, num_gpus=num_gpus,
                                 pipeline_name=pipeline_name, data_hash=data_hash)
    model.metadata.update(runtime.model_metadata(p, summary))
    for name, value in runtime.summary_metrics(summary).items():
        metrics.log_metric(name, value)


@dsl.component(**_IN_IMAGE)
def train_stage2(params: str, dataset: Input[Dataset], stage1_model: Input[Model],
                 pipeline_id: str, pipeline_name: str, data_hash: str, checkpoint_prefix: str,
                 num_gpus: int, nodes: int, model: Output[Model], metrics: Output[Metrics]):
    """Stage 2: from the stage-1 weights, everything trained at lr * stage2.lr_factor. With
    `nodes` > 1: on that many GPU nodes as a Kubeflow Trainer TrainJob that this step
    launches and awaits (components/multinode.py; `checkpoint_prefix`, s3://, is where the
    nodes exchange data, checkpoints and the result)."""
    from components import multinode, runtime
    runtime.start_step()
    p = runtime.params_from_json(params)
    if nodes > 1:
        summary = multinode.stage2_task(p, dataset.path, stage1_model.path, model.path, nodes=nodes,
                                        gpus_per_node=num_gpus, pipeline_id=pipeline_id,
                                        stage_prefix=checkpoint_prefix, checkpoint_prefix=checkpoint_prefix,
                                        pipeline_name=pipeline_name, data_hash=data_hash)
    else:
        summary = runtime.train_task(p, dataset.path, model.path, stage=2, init_from=stage1_model.path,
                                     pipeline_id=pipeline_id, checkpoint_prefix=checkpoint_prefix,
                                     num_gpus=num_gpus, pipeline_name=pipeline_name, data_hash=data_hash)
    model.metadata.update(runtime.model_metadata(p, summary))
    for name, value in runtime.summary_metrics(summary).items():
        metrics.log_metric(name, value)


@dsl.component(**_IN_IMAGE)
def evaluate(params: str, dataset: Input[Dataset], model: Input[Model], pipeline_id: str,
             pipeline_name: str, data_hash: str, metrics: Output[Metrics],
             confusion_matrix: Output[ClassificationMetrics], report: Output[HTML],
             evaluation: Output[Artifact]) -> float:
    """Test-split metrics, confusion matrix, report.html; the full folder as `evaluation`.
    Returns the validation value of `register.metric`, which the pipeline's gate compares (a single
    return value: kfp.local resolves a condition on it, not on a NamedTuple field)."""
    import json
    import shutil
    from pathlib import Path

    from components import runtime
    runtime.start_step()
    p = runtime.params_from_json(params)
    values = runtime.evaluate_task(p, dataset.path, model.path, evaluation.path, pipeline_id,
                                   pipeline_name=pipeline_name, data_hash=data_hash)
    for name, value in values.items():
        metrics.log_metric(name, value)
    cm = json.loads((Path(evaluation.path) / "confusion_matrix.json").read_text())
    confusion_matrix.log_confusion_matrix(cm["labels"], cm["matrix"])
    shutil.copyfile(Path(evaluation.path) / "report.html", report.path)
    return runtime.gate_value(p, evaluation.path)


@dsl.component(**_IN_IMAGE)
def register(params: str, model: Input[Model], evaluation: Input[Artifact], pipeline_id: str,
             pipeline_name: str, data_hash: str,
             ) -> NamedTuple("Registration", [("model_name", str), ("version", str)]):
    """A new version of the registered model, alias `challenger` (idempotent). Reads no
    data: the data hash comes from prepare."""
    from components import runtime
    runtime.start_step()
    p = runtime.params_from_json(params)
    reg = runtime.register_task(p, model.path, evaluation.path, pipeline_id,
                                pipeline_name=pipeline_name, data_hash=data_hash)
    print(f"{'registered' if reg['created'] else 'already registered'}: {reg['name']} "
          f"version {reg['version']} (run {reg['run_id']})")
    return (str(reg["name"]), str(reg["version"]))


@dsl.component(**_IN_IMAGE)
def promote(params: str, version: str, dataset: Input[Dataset],
            ) -> NamedTuple("Promotion", [("decision", str), ("champion", str)]):
    """`champion` moves to this version when it beats the champion by the margin on the
    validation split (a champion measured on other data is re-evaluated on `dataset`)."""
    from components import runtime
    runtime.start_step()
    res = runtime.promote_task(runtime.params_from_json(params), version, dataset.path)
    print(f"promotion of {res['model_name']} v{res['candidate']} ({res['metric']} "
          f"{res['candidate_value']}): {res['decision']} - {res['reason']}")
    return (str(res["decision"]), str(res["champion_after"]))


@dsl.component(**_IN_LIGHT_IMAGE)
def close_pipeline_run(pipeline_id: str, pipeline_name: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: runs however the pipeline ended. When a step failed (or its pod was
    killed), the MLflow parent run and any stage run still RUNNING are closed as FAILED."""
    from components import runtime
    runtime.start_step()
    print(runtime.close_pipeline_run(pipeline_id, pipeline_name, status.state,
                                     status.error_message))
