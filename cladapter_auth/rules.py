"""The promoter rule: which REST calls only promoters may make (see the package docstring).

Each guarded call is found by its (path, method) in MLflow's own route table
(`handlers.get_endpoints`: the /api and /ajax-api paths of every version), and its fields
are read with the function MLflow's handler reads them with (`_get_request_message`), so
the rule sees exactly the name, alias or version the handler will act on.
"""
from __future__ import annotations

import logging

from flask import Response, g, request
from mlflow.exceptions import MlflowException
from mlflow.protos import model_registry_pb2 as mr
from mlflow.protos import service_pb2 as sv
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
from mlflow.server.handlers import _get_model_registry_store, _get_request_message, get_endpoints

log = logging.getLogger(__name__)


PROMOTER, WRITER = "promoters", "writers"


def _always(rules, msg):
    return PROMOTER, f"{type(msg).__name__} of registered model {msg.name!r}"


def _alias(rules, msg):
    if rules.protected(msg.alias):
        return PROMOTER, f"{type(msg).__name__}: moving or removing alias {msg.alias!r} of {msg.name!r}"
    return None


def _served_version(rules, name: str, version: str) -> str | None:
    """The protected alias `version` of `name` holds, if any."""
    try:
        mv = _get_model_registry_store().get_model_version(name, version)
    except MlflowException:
        return None  # no such version: the handler answers that
    return next((a for a in mv.aliases if rules.protected(a)), None)


def _version(rules, msg):
    alias = _served_version(rules, msg.name, msg.version)
    if alias:
        return PROMOTER, f"{type(msg).__name__} on {msg.name!r} v{msg.version}, the version {alias!r} points at"
    return None


def _version_tag(rules, msg):
    if msg.key.startswith("promotion."):
        return PROMOTER, f"{type(msg).__name__} {msg.key!r}: promotion evidence"
    return _version(rules, msg)


def _experiment(rules, msg):
    name = msg.new_name if isinstance(msg, sv.UpdateExperiment) else msg.name
    if name and name.strip().casefold() == rules.lock_experiment.casefold():
        return PROMOTER, f"{type(msg).__name__} {name!r}: the promotion-lock experiment"
    if isinstance(msg, sv.CreateExperiment) and rules.writers is not None:
        return WRITER, f"creating experiment {name!r}"
    return None


def _new_model(rules, msg):
    if rules.writers is not None:
        return WRITER, f"creating registered model {msg.name!r}"
    return None


CHECKS = {
    mr.SetRegisteredModelAlias: _alias,
    mr.DeleteRegisteredModelAlias: _alias,
    mr.DeleteRegisteredModel: _always,
    mr.RenameRegisteredModel: _always,
    mr.DeleteModelVersion: _version,
    mr.UpdateModelVersion: _version,
    mr.TransitionModelVersionStage: _version,
    mr.SetModelVersionTag: _version_tag,
    mr.DeleteModelVersionTag: _version_tag,
    mr.CreateRegisteredModel: _new_model,
    sv.CreateExperiment: _experiment,
    sv.UpdateExperiment: _experiment,
}


def routes() -> dict[tuple[str, str], type]:
    """(path, method) -> request class of every guarded call, from MLflow's route table."""
    table = get_endpoints(lambda cls: cls if cls in CHECKS else None)
    return {(path, method): cls for path, cls, methods in table if cls in CHECKS for method in methods}


def forbidden(message: str) -> Response:
    err = MlflowException(message, error_code=PERMISSION_DENIED)
    return Response(err.serialize_as_json(), status=403, mimetype="application/json")


def _allowed(rules, level: str, username: str | None) -> bool:
    if not username:
        return False
    if username in rules.promoters or (level == WRITER and username in rules.writers):
        return True
    from mlflow.server.auth import store
    try:
        return bool(store.get_user(username).is_admin)
    except MlflowException:
        return False


def guard(rules):
    table = routes()
    if not table:  # MLflow renamed its routes: fail loudly rather than guard nothing
        raise RuntimeError("cladapter-auth: none of the guarded MLflow routes was found")

    def cladapter_promoter_rule():
        cls = table.get((request.path, request.method))
        if cls is None:
            return None
        try:
            found = CHECKS[cls](rules, _get_request_message(cls()))
        except MlflowException as e:  # a malformed request: its handler gives the same error
            return Response(e.serialize_as_json(), status=e.get_http_status_code(),
                            mimetype="application/json")
        if found is None:
            return None
        level, what = found
        user = getattr(g, "mlflow_authenticated_user", None)
        if _allowed(rules, level, user):
            log.info("cladapter-auth: %s by %r", what, user)
            return None
        log.warning("cladapter-auth: refused to %r: %s", user, what)
        env = "CLADAPTER_PROMOTERS" if level == PROMOTER else "CLADAPTER_WRITERS"
        return forbidden(f"Permission denied: {what} is for {level} only, and user {user!r} is "
                         f"not one of them (the MLflow server's {env} names them; ask its "
                         "administrator)")

    return cladapter_promoter_rule
