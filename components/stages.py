"""The KFP v2 components, one per stage. Each is a lightweight Python component that runs
in the project image (`cladapter_core.settings.IMAGE`, which has kfp and this package:
nothing is pip-installed at run time) and whose body only turns KFP artifacts into paths
and calls `components.runtime`, which calls `cladapter_core`.

KFP serialises each function's source, so the bodies import what they use.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from cladapter_core.settings import IMAGE

# No `from __future__ import annotations` here: KFP reads the real annotation types.
# install_kfp_package=False: the image has kfp; its pods run offline and non-root.
_IN_IMAGE = dict(base_image=IMAGE, install_kfp_package=False)


@dsl.component(**_IN_IMAGE)
def resolve_params(
    dataset_uri: str, seed: int, backbone: str, backbone_kwargs: dict, pretrained: bool,
    checkpoint_uri: str, num_centers: int, batch_size: int, stage1_epochs: int,
    stage1_lr: float, stage2_epochs: int, stage2_lr: float, model_name: str,
    promotion_margin: float, params_overrides: str,
) -> NamedTuple("ResolvedParams", [("params", str), ("data_params", str)]):
    """The run's parameters -> the full, validated params (JSON); every problem at once."""
    import json

    from components import runtime
    values = dict(dataset_uri=dataset_uri, seed=seed, backbone=backbone,
                  backbone_kwargs=backbone_kwargs, pretrained=pretrained,
                  checkpoint_uri=checkpoint_uri, num_centers=num_centers,
                  batch_size=batch_size, stage1_epochs=stage1_epochs, stage1_lr=stage1_lr,
                  stage2_epochs=stage2_epochs, stage2_lr=stage2_lr, model_name=model_name,
                  promotion_margin=promotion_margin)
    params = runtime.resolve_params(values, params_overrides)
    print(json.dumps(params, indent=2, sort_keys=True))
    return (json.dumps(params, sort_keys=True), json.dumps(runtime.data_part(params), sort_keys=True))


@dsl.component(**_IN_IMAGE)
def prepare(dataset_uri: str, dataset_path: str, dataset_rev: str, data_params: str,
            dataset: Output[Dataset]):
    """Fetch the dataset, validate and split it; the artifact holds data + manifest."""
    from components import runtime
    params = runtime.params_from_json(data_params)
    summary = runtime.prepare_task(dataset_uri, dataset_path, dataset_rev, params, dataset.path)
    dataset.metadata.update({"source": dataset_uri, "num_classes": summary["num_classes"],
                             "classes": summary["classes"], **summary["totals"],
                             "leaks": summary["num_leaks"], "skipped": len(summary["skipped"])})


@dsl.component(**_IN_IMAGE)
def tune(params: str, dataset: Input[Dataset], n_trials: int, pipeline_id: str,
         tuning: Output[Artifact], metrics: Output[Metrics]) -> str:
    """Optuna search over tune.space when n_trials > 0; returns the params to train with
    (the best trial's values applied), else the params unchanged."""
    import json

    from components import runtime
    p = runtime.params_from_json(params)
    tuned, summary = runtime.tune_task(p, dataset.path, tuning.path, n_trials, pipeline_id)
    if summary is not None:
        metrics.log_metric("best_val_macro_f1", float(summary["best_value"]))
        for key in ("n_trials", "complete", "pruned", "failed"):
            metrics.log_metric(key, float(summary[key]))
        tuning.metadata.update({"best_params": summary["best_params"], "study": summary["study_name"]})
    return json.dumps(tuned, sort_keys=True)


@dsl.component(**_IN_IMAGE)
def train_stage1(params: str, dataset: Input[Dataset], pipeline_id: str,
                 checkpoint_prefix: str, num_gpus: int, model: Output[Model],
                 metrics: Output[Metrics]):
    """Stage 1: backbone frozen, adapter + head trained."""
    from components import runtime
    p = runtime.params_from_json(params)
    summary = runtime.train_task(p, dataset.path, model.path, stage=1, pipeline_id=pipeline_id,
                                 checkpoint_prefix=checkpoint_prefix, num_gpus=num_gpus)
    model.metadata.update(runtime.model_metadata(p, summary))
    for name, value in runtime.summary_metrics(summary).items():
        metrics.log_metric(name, value)


@dsl.component(**_IN_IMAGE)
def train_stage2(params: str, dataset: Input[Dataset], stage1_model: Input[Model],
                 pipeline_id: str, checkpoint_prefix: str, num_gpus: int,
                 model: Output[Model], metrics: Output[Metrics]):
    """Stage 2: from the stage-1 weights, everything trained at lr * stage2.lr_factor."""
    from components import runtime
    p = runtime.params_from_json(params)
    summary = runtime.train_task(p, dataset.path, model.path, stage=2, init_from=stage1_model.path,
                                 pipeline_id=pipeline_id, checkpoint_prefix=checkpoint_prefix,
                                 num_gpus=num_gpus)
    model.metadata.update(runtime.model_metadata(p, summary))
    for name, value in runtime.summary_metrics(summary).items():
        metrics.log_metric(name, value)


@dsl.component(**_IN_IMAGE)
def evaluate(params: str, dataset: Input[Dataset], model: Input[Model], pipeline_id: str,
             metrics: Output[Metrics], confusion_matrix: Output[ClassificationMetrics],
             report: Output[HTML], evaluation: Output[Artifact]) -> float:
    """Test-split metrics, confusion matrix, report.html; the full folder as `evaluation`.
    Returns the macro-F1, which the pipeline's gate compares (a single return value:
    kfp.local resolves a condition on it, not on a NamedTuple field)."""
    import json
    import shutil
    from pathlib import Path

    from components import runtime
    p = runtime.params_from_json(params)
    values = runtime.evaluate_task(p, dataset.path, model.path, evaluation.path, pipeline_id)
    for name, value in values.items():
        metrics.log_metric(name, value)
    cm = json.loads((Path(evaluation.path) / "confusion_matrix.json").read_text())
    confusion_matrix.log_confusion_matrix(cm["labels"], cm["matrix"])
    shutil.copyfile(Path(evaluation.path) / "report.html", report.path)
    return float(values.get("macro_f1", 0.0))


@dsl.component(**_IN_IMAGE)
def register(params: str, dataset: Input[Dataset], model: Input[Model],
             evaluation: Input[Artifact], pipeline_id: str,
             ) -> NamedTuple("Registration", [("model_name", str), ("version", str)]):
    """A new version of the registered model, alias `challenger` (idempotent)."""
    from components import runtime
    p = runtime.params_from_json(params)
    reg = runtime.register_task(p, dataset.path, model.path, evaluation.path, pipeline_id)
    print(f"{'registered' if reg['created'] else 'already registered'}: {reg['name']} "
          f"version {reg['version']} (run {reg['run_id']})")
    return (str(reg["name"]), str(reg["version"]))


@dsl.component(**_IN_IMAGE)
def promote(params: str, version: str,
            ) -> NamedTuple("Promotion", [("decision", str), ("champion", str)]):
    """`champion` moves to this version when it beats the champion by the margin."""
    from components import runtime
    res = runtime.promote_task(runtime.params_from_json(params), version)
    print(f"promotion of {res['model_name']} v{res['candidate']} ({res['metric']} "
          f"{res['candidate_value']}): {res['decision']} - {res['reason']}")
    return (str(res["decision"]), str(res["champion_after"]))
