"""A step's MLflow run: a child of the pipeline run (the KFP run id), tagged with its lineage."""
from __future__ import annotations

import contextlib

from cladapter_core import identity
from cladapter_core.settings import exported, tracking_on
from components.dataset import artifact_prepared, read_source_ref


# -- MLflow ------------------------------------------------------------------------------
def pipeline_env(pipeline_id: str):
    """$CLADAPTER_PIPELINE_ID = the KFP run id while the step runs: tracking makes every
    step's run a child of one parent run per pipeline run."""
    return exported(pipeline_id=pipeline_id) if pipeline_id else contextlib.nullcontext()


@contextlib.contextmanager
def stage_tracking(params: dict, stage: str, pipeline_id: str, data_hash: str | None,
                   pipeline_name: str = "", dataset_dir=None):
    """The MLflow stage run of one step, a child of the pipeline run `pipeline_id`
    (the KFP run id) and tagged with its lineage (`components.lineage`); the parent run
    is named after the KFP run (`pipeline_name`). Yields None when tracking is off
    (CLADAPTER_TRACKING=0). `data_hash` defaults to that of the Dataset artifact `dataset_dir`."""
    if not tracking_on():
        yield None
        return
    from cladapter_core import tracking
    from components import lineage
    source = read_source_ref(dataset_dir) if dataset_dir is not None else None
    prepared = artifact_prepared(dataset_dir) if dataset_dir is not None else None
    data_hash = data_hash or (identity.data_hash(prepared) if prepared is not None else None)
    with pipeline_env(pipeline_id):
        tracking.check_tracking()
        with tracking.stage_run(params, stage, data_hash=data_hash, prepared=prepared) as run:
            tags = lineage.lineage_tags(pipeline_id, pipeline_name, data_hash or "", source)
            with tracking.errors(f"tagging the MLflow run of stage {stage!r}"):
                lineage.tag_stage_and_parent(run, tags, pipeline_name)
            yield run


def close_pipeline_run(pipeline_id: str, pipeline_name: str, state: str, error: str = "") -> str:
    """The exit handler's work (`lineage.close_pipeline_run`); nothing when tracking is off."""
    if not tracking_on():
        return f"pipeline run ended {state} (tracking off)"
    from components import lineage
    with pipeline_env(pipeline_id):
        return lineage.close_pipeline_run(pipeline_id, pipeline_name, state, error)
