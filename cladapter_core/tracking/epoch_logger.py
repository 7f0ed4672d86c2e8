"""`EpochLogger`: the trainer callback that logs every epoch's numbers to the stage's run."""
from __future__ import annotations

import json
import math
import time
import warnings
from typing import Any

from ..training import Callback
from ..errors import TrackingError
from .datasets import log_data_inputs
from .runs import _active_run_id, _flat
from .store import _short, redact, redact_params, tracking_uri

# -- what stages log -----------------------------------------------------------------------
def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isinf(v))


class EpochLogger(Callback):
    """Trainer callback: logs each epoch's numbers as MLflow metrics (step = epoch).

    Use inside ``stage_run``: ``train.train(..., callbacks=[tracking.EpochLogger()])``.
    ``on_epoch_end`` logs every numeric field of the record (train_loss, val_loss,
    val_<metric>, lr, seconds, ...) except ``epoch`` and ``stage``; a record of another
    stage than the one training started with is prefixed ``stage<N>/`` so the curves of
    two stages in one run do not overwrite each other. A failed write (server down) is
    warned about, kept, and retried with the next epoch: tracking never stops training.
    Values still unsent when training ends are tried a few more times (``FINAL_RETRIES``),
    then ``on_train_end`` raises ``TrackingError``: the stage fails rather than end as a
    success with a gap in its metrics. When training fails, ``on_exception`` sends what
    it still holds (the epochs before the failure) once more before the error propagates.
    """

    SKIP = ("epoch", "stage")
    FINAL_RETRIES = (1.0, 2.0, 4.0)    # seconds before each last try at training's end

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id
        self.stage = None
        self.out_dir = None
        self._pending: list = []
        self._warned = False
        self._last_error = ""

    # the trainer's hooks -----------------------------------------------------------
    def on_train_start(self, info: dict) -> None:
        self.run_id = self.run_id or _active_run_id("EpochLogger")
        self.stage = info.get("stage")
        self.out_dir = info.get("out_dir")
        if info.get("prepared_dir") and info.get("params") is not None:  # the data it trains on
            self._safe(lambda: log_data_inputs(info["params"], info["prepared_dir"], ("train", "val"),
                                               run_id=self.run_id))
        report = info.get("param_report") or {}
        metrics = {f"params_{k}": v for k, v in report.items() if _numeric(v)}
        self._log(metrics, step=0)
        if report:
            self._safe(lambda: self._client().log_dict(
                self.run_id, redact_params(report), "param_report.json"))
        if info.get("mode") is not None:
            self._safe(lambda: self._client().set_tag(self.run_id, "mode", str(info["mode"])))

    def on_epoch_end(self, record: dict) -> None:
        if self.run_id is None:  # used without on_train_start
            self.run_id = _active_run_id("EpochLogger")
        stage = record.get("stage")
        prefix = f"stage{stage}/" if stage is not None and self.stage is not None \
            and stage != self.stage else ""
        metrics = {f"{prefix}{k}": v for k, v in record.items()
                   if k not in self.SKIP and _numeric(v)}
        self._log(metrics, step=int(record.get("epoch", 0) or 0))

    def on_train_end(self, result: dict) -> None:
        if self.run_id is None:
            return
        flat = _flat(result) if isinstance(result, dict) else {}
        self._log({f"summary.{k}": v for k, v in flat.items() if _numeric(v)}, step=0)
        if isinstance(result, dict):
            self._safe(lambda: self._client().log_text(
                self.run_id, json.dumps(redact_params(result), indent=2, default=str), "train_summary.json"))
        for delay in self.FINAL_RETRIES:
            if not self._pending:
                break
            time.sleep(delay)
            self._log({}, step=0)
        if self._pending:
            steps = sorted({m.step for m in self._pending})
            raise TrackingError(
                f"MLflow: {len(self._pending)} metric values (steps {steps}) could not be logged "
                f"to run {self.run_id} on {redact(tracking_uri())}, unreachable until training "
                f"ended ({self._last_error}); the model in {self.out_dir} is complete - run the "
                "stage again once the server is back to record its metrics")

    def on_exception(self, error: BaseException) -> None:
        if self.run_id is not None and self._pending:
            self._log({}, step=0)

    # internals -----------------------------------------------------------------------
    @staticmethod
    def _client():
        from mlflow import MlflowClient
        return MlflowClient()

    def _log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if self._pending:  # MlflowClient.log_batch splits it into batches the server takes
            batch = self._pending
            if self._safe(lambda: self._client().log_batch(self.run_id, metrics=batch)):
                self._pending = []

    def _safe(self, fn) -> bool:
        try:
            fn()
            return True
        except Exception as e:
            self._last_error = f"{type(e).__name__}: {_short(e)}"
            if not self._warned:
                warnings.warn(f"MLflow logging to {redact(tracking_uri())} failed "
                              f"({type(e).__name__}: {_short(e)}); training goes on")
                self._warned = True
            return False
