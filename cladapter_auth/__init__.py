"""`cladapter-auth`: MLflow's basic-auth app plus the promoter rule.

Started as ``mlflow server --app-name cladapter-auth`` (the ``mlflow.app`` entry point).
MLflow's basic-auth app authenticates every request (HTTP basic, users and per-resource
permissions in its own database); it asks the same permission, EDIT on the registered
model, to create a version and to move an alias, and gives the creator of a model MANAGE
on it. So a pipeline identity able to register versions could also move ``champion``. This
app adds one rule, checked after MLflow's own: the operations that change what is served
are for promoters only (users named in ``CLADAPTER_PROMOTERS``, and MLflow admins):

- set or delete a protected alias (``CLADAPTER_PROTECTED_ALIASES``, default ``champion``);
- delete or rename a registered model;
- delete, update, re-stage or (un)tag a version a protected alias points at, and write or
  delete a ``promotion.*`` tag (the evidence of a promotion) on any version;
- create (or rename an experiment into) the promotion-lock experiment
  (``CLADAPTER_LOCK_EXPERIMENT``), so its creator, who gets MANAGE on it, is a promoter and
  pipeline identities can only read the lock.

And, when ``CLADAPTER_WRITERS`` is set, only those users (and promoters and admins) may
create experiments and registered models: without it MLflow lets every authenticated user
create them (and own them), so a reader could write in resources of its own.

Everyone else gets 403 with a message saying so, whatever their permission on the model.
MLflow's GraphQL endpoint has no registry mutation (one test echo), so nothing to guard there.

Settings (environment of the server process):
``CLADAPTER_AUTH_DATABASE_URI``: the auth database, overriding ``database_uri`` of MLflow's
auth config file (which holds no secret then, and the URI can come from a Secret);
MLflow's own ``MLFLOW_AUTH_ADMIN_USERNAME``/``MLFLOW_AUTH_ADMIN_PASSWORD``,
``MLFLOW_FLASK_SERVER_SECRET_KEY`` and ``MLFLOW_AUTH_CONFIG_PATH`` apply unchanged.

This package imports MLflow only (it runs in the small server image, without torch) and
nothing of `cladapter_core`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROMOTERS_ENV = "CLADAPTER_PROMOTERS"
WRITERS_ENV = "CLADAPTER_WRITERS"
ALIASES_ENV = "CLADAPTER_PROTECTED_ALIASES"
LOCK_EXPERIMENT_ENV = "CLADAPTER_LOCK_EXPERIMENT"
DATABASE_URI_ENV = "CLADAPTER_AUTH_DATABASE_URI"
# Equal to cladapter_core.registry.versions.CHAMPION / LOCK_EXPERIMENT (tests/test_auth.py).
DEFAULT_ALIASES = "champion"
DEFAULT_LOCK_EXPERIMENT = "cladapter-promotion-locks"
EVIDENCE_TAG_PREFIX = "promotion."


@dataclass(frozen=True)
class Rules:
    promoters: frozenset[str]
    writers: frozenset[str] | None  # None: anyone authenticated may create (MLflow's default)
    aliases: frozenset[str]          # casefolded: a case-insensitive database must not
    lock_experiment: str             # let `Champion` through

    @classmethod
    def from_env(cls, env=None) -> "Rules":
        env = os.environ if env is None else env

        def names(key: str, default: str = "") -> list[str]:
            return [n.strip() for n in env.get(key, default).split(",") if n.strip()]
        aliases = names(ALIASES_ENV, DEFAULT_ALIASES)
        if not aliases:
            raise ValueError(f"{ALIASES_ENV} is set but names no alias: it must name the "
                             "alias(es) only promoters may move, e.g. 'champion'")
        writers = frozenset(names(WRITERS_ENV)) if env.get(WRITERS_ENV, "").strip() else None
        return cls(promoters=frozenset(names(PROMOTERS_ENV)), writers=writers,
                   aliases=frozenset(a.casefold() for a in aliases),
                   lock_experiment=env.get(LOCK_EXPERIMENT_ENV, "").strip() or DEFAULT_LOCK_EXPERIMENT)

    def protected(self, alias: str | None) -> bool:
        return bool(alias) and alias.casefold() in self.aliases


def _use_database_uri() -> None:
    """Point MLflow's auth config at CLADAPTER_AUTH_DATABASE_URI (read before the store starts)."""
    uri = os.environ.get(DATABASE_URI_ENV, "").strip()
    if not uri:
        return
    from mlflow.server import auth
    auth.auth_config = auth.auth_config._replace(database_uri=uri)


def _stop_the_server() -> None:
    """A bad setting (no admin password, no CSRF key, an unreachable users' database) fails
    every worker alike. `mlflow server` checks these before starting workers only for its
    own `basic-auth` app; for this one uvicorn's supervisor would restart the failing
    workers for ever, so stop it: the server stops, its log naming the error (exit status 0:
    uvicorn's on SIGTERM; Kubernetes restarts the container all the same)."""
    log.critical("cladapter-auth: the server cannot start (the error follows); stopping it")
    if os.environ.get("_MLFLOW_SGI_NAME") == "uvicorn":
        os.kill(os.getppid(), signal.SIGTERM)


INIT_LOCK_KEY = 0x636C6164  # "clad": the advisory lock the workers take around the auth store's init


@contextlib.contextmanager
def _one_worker_at_a_time(uri: str):
    """MLflow's auth app creates and migrates its users' tables when a worker starts: on a
    fresh database two workers (or replicas) race on alembic's version table and one dies,
    which stops the server. Serialize that start: a PostgreSQL advisory lock (every replica
    shares it), else a lock file (SQLite is one machine's)."""
    if uri.startswith("postgresql"):
        import sqlalchemy
        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": INIT_LOCK_KEY})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": INIT_LOCK_KEY})
        finally:
            engine.dispose()
        return
    import fcntl
    import tempfile
    with open(os.path.join(tempfile.gettempdir(), "cladapter-auth-init.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def create_app(app=None):
    """The MLflow server app: basic auth, then the promoter rule (a Flask before_request that
    runs after MLflow's, so requests reaching it are authenticated)."""
    rules = Rules.from_env()
    _use_database_uri()
    from mlflow.server import app as flask_app
    from mlflow.server import auth
    from mlflow.server.auth import create_app as basic_auth_app

    from .rules import guard
    flask_app = app if app is not None else flask_app
    try:
        with _one_worker_at_a_time(auth.auth_config.database_uri):
            served = basic_auth_app(flask_app)
    except Exception:
        _stop_the_server()
        raise
    flask_app.before_request(guard(rules))
    log.info("cladapter-auth: promoters %s; writers %s; protected aliases %s; lock experiment %r",
             sorted(rules.promoters) or "(admins only)",
             "(anyone authenticated)" if rules.writers is None else sorted(rules.writers),
             sorted(rules.aliases), rules.lock_experiment)
    if rules.writers is None:
        log.warning("cladapter-auth: %s is not set: every authenticated user may create "
                    "experiments and registered models", WRITERS_ENV)
    return served
