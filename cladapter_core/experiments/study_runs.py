"""MLflow runs of a study (`cladapter sweep`, `cladapter compare`): one parent run with the
study's settings, the params, the datasets it trained and scored on, and its table and plot
as artifacts; one child run per cell (a value and a seed, a method and a seed) with the
cell's scores.

A resumable study (sweep) finds its parent again by a tag of its settings on a rerun and
logs only the cells not logged before; a study that recomputes everything (compare) gets a
new parent each time.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..params import flatten

CELL_TAG = "cladapter.cell"


class StudyRuns:
    def __init__(self, params: dict, study: dict, prepared_dir: Path, *, kind: str, run_name: str,
                 splits: tuple[str, ...], resume: bool):
        from mlflow import MlflowClient
        from .. import tracking
        cfg = tracking.configure(params, prepared_dir)
        self.client, self.exp = MlflowClient(), cfg["experiment_id"]
        tag_name = f"cladapter.{kind}"
        tag = hashlib.sha256(json.dumps({**study, "params": flatten(params)}, sort_keys=True,
                                        default=str).encode()).hexdigest()[:20]
        found = self.client.search_runs([self.exp], f"tags.`{tag_name}` = '{tag}'", max_results=1) if resume else []
        self.logged: set = set()
        if found:
            self.run_id = found[0].info.run_id
            self.logged = {r.data.tags.get(CELL_TAG) for r in self.client.search_runs(
                [self.exp], f"tags.`mlflow.parentRunId` = '{self.run_id}'", max_results=1000)}
            return
        self.run_id = self.client.create_run(self.exp, run_name=run_name, tags={tag_name: tag}).info.run_id
        try:
            logged = tracking.redact_params({**{f"{kind}.{k}": v for k, v in study.items()}, **flatten(params)})
            for k, v in logged.items():  # no credential of a URL-valued parameter (tune.storage)
                self.client.log_param(self.run_id, k, str(v)[:6000])
            # what every cell trained on and was scored on
            tracking.log_data_inputs(params, prepared_dir, splits, run_id=self.run_id)
        except BaseException:
            self.fail()
            raise

    def cell(self, key: str, name: str, params: dict, metrics: dict) -> None:
        """A child run for one cell, unless a rerun of the study logged it already."""
        if key in self.logged:
            return
        rid = self.client.create_run(self.exp, run_name=name, tags={
            "mlflow.parentRunId": self.run_id, CELL_TAG: key}).info.run_id
        from .. import tracking
        for k, v in tracking.redact_params(params).items():
            self.client.log_param(rid, k, str(v))
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v == v:  # NaN (an undefined score) is left out
                self.client.log_metric(rid, k, float(v))
        self.client.set_terminated(rid)
        self.logged.add(key)

    def finish(self, files: list[Path]) -> None:
        for f in files:
            self.client.log_artifact(self.run_id, str(f))
        self.client.set_terminated(self.run_id)

    def fail(self) -> None:
        """The study stopped with an error: its parent run says so instead of staying RUNNING."""
        self.client.set_terminated(self.run_id, status="FAILED")

