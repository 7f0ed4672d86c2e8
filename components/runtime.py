"""What the KFP components' bodies call: each function here is one stage as a pipeline
step runs it, built from the same `cladapter_core` functions the CLI and `dvc repro` call.

The stage tasks live here: `train_task` (one training stage inside an MLflow stage run;
torchrun when it has several GPUs; its resume checkpoint mirrored off the pod),
`tune_*_task`, `evaluate_task`, `register_task`, `promote_task`. What they build on is a
module per concern, re-exported here for the component bodies:
- `step`: `start_step()`, the first call of every body;
- `pipeline_params`: the pipeline's parameters -> the resolved, validated params dict;
- `dataset`: the dataset prepared by reference (`fetch_source`, `prepare_task`) and read
  back (`local_data`);
- `step_tracking`: a step's MLflow run under the pipeline run;
- `resume_mirror`: the trainer's resume checkpoint under `<checkpoint root>/<KFP run id>/<stage>/`.

Nothing here imports kfp: the components translate artifacts to paths and back.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cladapter_core.errors import CLAdapterError, ParamsError
from cladapter_core.settings import tracking_on
from components.dataset import (PREPARED, SOURCE, SOURCE_REF, artifact_prepared, data_version,  # noqa: F401
                                dataset_metadata, fetch_source, local_data, prepare_task, prepared_dir,
                                read_source_ref, resolve_rev, source_ref)
from components.pipeline_params import (DERIVED_FIELDS, PARAM_FIELDS, data_part, params_from_json,  # noqa: F401
                                        resolve_params, split_overrides)
from components.resume_mirror import CKPT_FILE, ResumeMirror, checkpoint_root  # noqa: F401
from components.step import drop_empty_env, start_step, use_scratch  # noqa: F401
from components.step_tracking import close_pipeline_run, pipeline_env, stage_tracking  # noqa: F401

# -- training ------------------------------------------------------------------------------
TRAIN_SPLITS = ("train", "val")  # what training and tuning read; evaluation: its split and val
def _torchrun(params: dict, prepared: Path, out: Path, stage: int, init_from, nproc: int,
              run_id: str | None) -> dict:
    """Train with `nproc` processes of this node (DDP, one GPU each) through torchrun."""
    with tempfile.TemporaryDirectory(prefix="cladapter-ddp-") as tmp:
        params_file = Path(tmp) / "params.json"
        params_file.write_text(json.dumps(params))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "components.torchrun_train",
               "--params-json", str(params_file), "--prepared", str(prepared), "--out", str(out),
               "--stage", str(stage)]
        if init_from:
            cmd += ["--init-from", str(init_from)]
        if run_id:
            cmd += ["--run-id", run_id]
        env = dict(os.environ)
        from cladapter_core.tracking import tracking_uri
        env["MLFLOW_TRACKING_URI"] = tracking_uri()  # the ranks log to the same store
        proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise CLAdapterError(f"torchrun with {nproc} processes failed (exit code {proc.returncode}); "
                             "its output is above")
    summary = json.loads((out / "train_summary.json").read_text())
    return summary


def train_task(params: dict, dataset_dir, out_dir, stage: int, init_from=None,
               pipeline_id: str = "", checkpoint_prefix: str = "", num_gpus: int = 1,
               pipeline_name: str = "", data_hash: str = "") -> dict:
    """One training stage of a pipeline run; returns the trainer's summary.

    `num_gpus` > 1 runs DDP through torchrun (one process per GPU). With
    `checkpoint_prefix`, the checkpoint is mirrored there (see ResumeMirror).
    """
    from cladapter_core import tracking
    from cladapter_core.training import checkpoint_dir, train

    if stage not in (1, 2):
        raise ParamsError(f"stage must be 1 or 2, got {stage!r}")
    out = Path(out_dir)
    mode = params["train"]["mode"]
    root = checkpoint_root(checkpoint_prefix)
    store = ResumeMirror(root, pipeline_id, f"train_stage{stage}") if root else None
    local_ckpt = checkpoint_dir(out) / CKPT_FILE
    if store is not None and store.restore(local_ckpt):
        print(f"checkpoint restored from {store.uri}")
    watch = store.watch(local_ckpt) if store is not None else contextlib.nullcontext()
    with stage_tracking(params, f"train_stage{stage}", pipeline_id, data_hash,
                        pipeline_name, dataset_dir) as run, local_data(dataset_dir, TRAIN_SPLITS) as prepared:
        with watch:
            if num_gpus > 1:
                summary = _torchrun(params, prepared, out, stage, init_from, num_gpus,
                                    run.info.run_id if run is not None else None)
            else:
                callbacks = [tracking.EpochLogger()] if run is not None else []
                summary = train(params, prepared, out, stage=stage, mode=mode, init_from=init_from,
                                resume=True, callbacks=callbacks, progress=False)
        if run is not None:
            tracking.log_artifacts_dir(out, "model_dir")
    if store is not None:
        store.clear()
    return summary


def model_metadata(params: dict, summary: dict) -> dict:
    """What the KFP UI shows on a Model artifact."""
    m = params["model"]
    return {"backbone": m["backbone"], "K": m["num_centers"], "rank": m["rank"],
            "mode": summary["mode"], "stage": summary["stage"], "best_epoch": summary["best_epoch"],
            "select_metric": summary["select_metric"], "best_value": summary["best_value"],
            "framework": "pytorch", "format": "cladapter model directory (model.safetensors, config.json)"}


def summary_metrics(summary: dict) -> dict[str, float]:
    """The trainer's summary as KFP metrics (numbers only)."""
    out = {f"best_val_{summary['select_metric']}": summary["best_value"],
           "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
           "lr": summary["lr"], "seconds": summary["seconds"]}
    for k, v in (summary.get("param_report") or {}).items():
        out[f"params_{k}"] = v
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# -- tuning --------------------------------------------------------------------------------
def tune_plan_task(params: dict, n_trials: int, n_workers: int, pipeline_id: str = "") -> list[int]:
    """`tuning.tune_plan` in the pipeline run's MLflow context."""
    from components import tuning
    with pipeline_env(pipeline_id):
        return tuning.tune_plan(params, n_trials, n_workers, pipeline_id, tracking_on())


def tune_worker_task(params: dict, dataset_dir, worker_index: int, n_trials: int, n_workers: int,
                     pipeline_id: str = "", pipeline_name: str = "", data_hash: str = "") -> dict:
    """One tuning worker (`tuning.tune_worker`): its share of the trials."""
    import optuna

    from components import tuning
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tune prints one line per trial
    with pipeline_env(pipeline_id):
        if tracking_on():
            from cladapter_core import tracking
            tracking.check_tracking()
        with local_data(dataset_dir, TRAIN_SPLITS) as prepared:
            done = tuning.tune_worker(params, prepared, worker_index, n_trials,
                                      n_workers, pipeline_id, tracking_on())
    print(f"worker {worker_index}: trials {done['trials']} ({done['complete']} completed, "
          f"{done['pruned']} pruned, {done['failed']} failed)")
    return done


def tune_finish_task(params: dict, out_dir, pipeline_id: str = "", pipeline_name: str = "",
                     dataset_dir=None) -> tuple[dict, dict]:
    """The study's results (`tuning.tune_finish`: the best trials re-run on other seeds on
    the dataset's train and val files first); returns (tuned params, summary)."""
    from components import tuning
    with pipeline_env(pipeline_id):
        if dataset_dir is None or not params["tune"]["rerun_top"]:
            return tuning.tune_finish(params, out_dir, pipeline_id, tracking_on())
        with local_data(dataset_dir, TRAIN_SPLITS) as prepared:
            return tuning.tune_finish(params, out_dir, pipeline_id, tracking_on(), prepared)


# -- evaluation, registry ------------------------------------------------------------------
def evaluate_task(params: dict, dataset_dir, model_dir, out_dir, pipeline_id: str = "",
                  pipeline_name: str = "", data_hash: str = "") -> dict:
    """Evaluate into `out_dir` (metrics.json, confusion_matrix.json, report.html, ...);
    logs the metrics (`<split>_<name>`) and the folder to the MLflow stage run."""
    from cladapter_core import tracking
    from cladapter_core.evaluation.evaluate import evaluate
    from cladapter_core.evaluation.evaluate import DECISION_SPLIT
    splits = sorted({params["evaluate"]["split"], DECISION_SPLIT})
    with stage_tracking(params, "evaluate", pipeline_id, data_hash,
                        pipeline_name, dataset_dir) as run, local_data(dataset_dir, splits) as prepared:
        metrics = evaluate(model_dir, prepared, out_dir, params)
        if run is not None:
            tracking.log_evaluation(out_dir, metrics, split=params["evaluate"]["split"],
                                    prepared=prepared, params=params)  # the data, as MLflow inputs
    return metrics


def gate_value(params: dict, eval_dir) -> float:
    """The value the pipeline's gate compares with `min_metric`: `register.metric` on the
    validation split (`decision_metrics.json`), the one promotion compares: the test split
    never decides what is registered or promoted."""
    from cladapter_core.registry import read_decision
    value = read_decision(eval_dir, params["register"]["metric"])["metrics"][params["register"]["metric"]]
    return value if math.isfinite(value) else -1e30  # NaN: the gate stays shut


def register_task(params: dict, model_dir, eval_dir, pipeline_id: str = "",
                  pipeline_name: str = "", data_hash: str = "") -> dict:
    """Register the model (`registry.register`); reads no data: `data_hash` is prepare's."""
    from cladapter_core import registry
    from components import lineage
    with stage_tracking(params, "register", pipeline_id, data_hash or None, pipeline_name) as run:
        if run is None:
            raise CLAdapterError("register needs MLflow: unset CLADAPTER_TRACKING=0")
        reg = registry.register(model_dir, eval_dir, params, data_hash=data_hash or None)
        tags = lineage.lineage_tags(pipeline_id, pipeline_name, data_hash)
        from cladapter_core import tracking
        with tracking.errors(f"tagging {reg['name']} version {reg['version']}"):
            lineage.tag_model_version(reg["name"], reg["version"], tags)
        return reg


def promote_task(params: dict, version: str, dataset_dir=None) -> dict:
    """Promote `version`; with the dataset, a champion measured on other data is
    re-evaluated on this run's validation split before the decision. Files are fetched
    only then: a champion measured on the same data needs none."""
    from cladapter_core import registry, tracking
    tracking.check_tracking()
    if not dataset_dir:
        return registry.promote(params, version=version)
    split = _reevaluation_split(params, version)
    if split is None:
        return registry.promote(params, version=version, prepared_dir=artifact_prepared(dataset_dir))
    with local_data(dataset_dir, [split]) as prepared:
        return registry.promote(params, version=version, prepared_dir=prepared)


def _reevaluation_split(params: dict, version: str) -> str | None:
    """The split promotion will re-evaluate the champion on, or None when the champion
    and `version` were measured on the same data and split (or there is no champion)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from cladapter_core import registry, tracking
    tracking.configure(params)
    client, name = MlflowClient(), params["register"]["model_name"]
    with tracking.errors(f"reading registered model {name!r}"):
        candidate = client.get_model_version(name, str(version))
        try:
            champion = client.get_model_version_by_alias(name, registry.CHAMPION)
        except MlflowException:
            return None
    if str(champion.version) == str(candidate.version) or registry.same_evaluation(candidate, champion):
        return None
    return candidate.tags.get("metric_split") or "val"

