"""The MLflow model registry: register a trained, evaluated model; promote it; show its lineage.

Aliases (not the deprecated stages): ``challenger`` is the newest registration,
``champion`` the model to serve (``models:/<name>@champion``).

Version tags written by ``register``: ``run_id``, ``data_hash``, ``model_hash`` (content
hash of the model directory: what makes re-registration idempotent), ``git_commit``,
``pipeline_id``, ``metric.<name>`` for every metric on the decision split
(``register.split``, validation by default; ``metric_split`` names it and
``eval_data_hash`` identifies its data), ``test_metric.<name>`` for the reported split
(information only: promotion never reads it), and ``cladapter.registration`` =
``pending`` while being made, ``complete`` when done.

``promote`` decides on the decision split only, and compares two versions only when both
were measured on the same data (``eval_data_hash``) and split; otherwise it re-evaluates
the champion on the challenger's data first (the prepared folder must be at hand), or
refuses. It writes the decision with its evidence on the candidate (``promotion.decision``,
``.reason``, ``.compared_with``, ``.metric``, ``.split``, ``.data_hash``,
``.candidate_value``, ``.champion_value``, ``.champion_reevaluated``, ``.time``) and
``promotion.replaced_by`` on the old champion.

Also ``integrity.sha256`` and ``integrity.manifest``: every file of the logged model,
recorded at registration and checked before any load from the registry
(`registry/integrity.py`, `verified_model`); ``cladapter.registered_by``: the process that
registered it (a half-made version whose maker is dead is replaced, a live one waited for).

The lock that serialises concurrent promotions (renewed while held): `registry/lock.py`.
"""
from __future__ import annotations

from .lineage import format_lineage, lineage
from .integrity import DIGEST_TAG, MANIFEST_TAG
from .lock import HeldLock, promotion_lock
from .model_cache import (MODEL_CACHE_ENV, is_model_uri, model_cache_dir, model_version, pyfunc_of_folder,
                          resolve_model, verified_model)
from .promotion import decide, promote, reevaluate, register_and_promote, same_evaluation
from .versions import (CHALLENGER, CHAMPION, LOCK_EXPERIMENT, LOCK_FOR_TAG, METRIC_TAG, OWNER_TAG, STALE_LOCK_S,
                       STALE_PENDING_S, STATE_TAG, TEST_METRIC_TAG, read_decision, read_metrics, register)
from .versions import _alias  # noqa: F401  (tests read a version by alias)

__all__ = ["CHALLENGER", "CHAMPION", "DIGEST_TAG", "HeldLock", "LOCK_EXPERIMENT", "LOCK_FOR_TAG",
           "MANIFEST_TAG", "METRIC_TAG", "MODEL_CACHE_ENV", "OWNER_TAG", "STALE_LOCK_S", "STALE_PENDING_S",
           "STATE_TAG", "TEST_METRIC_TAG", "decide", "format_lineage", "is_model_uri",
           "lineage", "model_cache_dir", "model_version", "promote", "promotion_lock",
           "pyfunc_of_folder", "read_decision", "read_metrics", "reevaluate", "register",
           "register_and_promote", "resolve_model", "same_evaluation", "verified_model"]
