"""The scoring server that `cladapter serve` and the KServe InferenceService run: MLflow's
own, with limits in front of it.

MLflow 3's scoring server (mlflow/pyfunc/scoring_server/__init__.py: a FastAPI app that
`mlflow models serve` runs with uvicorn) reads the whole request body (`await
request.body()`) and parses it into a DataFrame before the model sees a row; neither it
nor uvicorn has a setting for the body's size (a 120 MB body cost the worker 650 MB), and
some of its error bodies carry the Python traceback (`stack_trace`) or echo the request.
So `python -m cladapter_core.serving.server` does what `mlflow models serve --env-manager
local` does (`_download_artifact_from_uri`, then `scoring_server.get_cmd`'s uvicorn command
and environment), with this module's `create_app` in place of
`mlflow.pyfunc.scoring_server.app:app`: the same MLflow app behind `Guard`, which

- answers 413 to a body over $CLADAPTER_SERVE_MAX_BYTES: from its Content-Length before
  a byte is read, or as soon as a chunked body passes the limit (nothing is kept);
- with $CLADAPTER_SERVE_TOKEN set, answers 401 to a request without `Authorization:
  Bearer <token>` (the health paths /ping, /health, /version stay open for probes);
- takes `stack_trace` and MLflow's echo of the request out of error bodies.

The model's own checks hold under plain `mlflow models serve` as well: rows per request
($CLADAPTER_SERVE_MAX_ROWS, pyfunc.py) and pixels per image (data/images.py).
"""
from __future__ import annotations

import argparse
import os
import hmac
import json
import logging
import shlex
import sys
from pathlib import Path

from ..settings import settings, var

log = logging.getLogger(__name__)
OPEN_PATHS = ("/ping", "/health", "/version")   # health probes: never behind the token
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding cladapter_core
MLFLOW_APP = "mlflow.pyfunc.scoring_server.app:app"
THIS_APP = "cladapter_core.serving.server:create_app"
# How MLflow prefixes errors with the request: the part before (first) or after (second) goes.
_ECHOES = (("Failed to predict data '", "\nError: ", "after"), ("", "\nInput: \n", "before"))


async def _answer(send, status: int, code: str, message: str, headers: tuple = ()) -> None:
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def _clean(body: bytes) -> bytes:
    """An MLflow error body without the traceback and without the request it echoes."""
    try:
        err = json.loads(body)
    except ValueError:
        return body
    if not isinstance(err, dict):
        return body
    err.pop("stack_trace", None)
    message = err.get("message")
    if isinstance(message, str):
        for start, sep, keep in _ECHOES:
            if message.startswith(start) and sep in message:
                message = message.split(sep, 1)[1] if keep == "after" else message.split(sep, 1)[0]
        err["message"] = message
    return json.dumps(err).encode()


class Guard:
    """ASGI layer: token, body size, clean error bodies (see the module docstring)."""

    def __init__(self, app, max_bytes: int, token: str | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token is not None and scope["path"] not in OPEN_PATHS and not hmac.compare_digest(
                headers.get(b"authorization", b""), b"Bearer " + self.token):
            return await _answer(send, 401, "UNAUTHENTICATED", "this server needs 'Authorization: "
                                 "Bearer <token>'", ((b"www-authenticate", b"Bearer"),))
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send, int(declared))
        body = await self._body(receive)
        if body is None:
            return await self._too_large(send, None)
        sent = False

        async def replay():
            nonlocal sent
            if sent:  # the app waits for a disconnect after the body: pass the real one on
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, replay, _cleaning(send))

    async def _body(self, receive) -> bytes | None:
        """The request body, or None once it passes the limit (what came is dropped)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _too_large(self, send, declared: int | None) -> None:
        size = f"of {declared:,} bytes " if declared is not None else ""
        await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED",
                      f"request body {size}over the limit of {self.max_bytes:,} bytes "
                      f"({var('serve_max_bytes')}); send fewer or smaller images per request",
                      ((b"connection", b"close"),))


def _cleaning(send):
    """`send` for MLflow's app: an error response's JSON body is held and cleaned."""
    held: dict = {}

    async def wrapped(message):
        if message["type"] == "http.response.start" and message["status"] >= 400:
            held["start"], held["body"] = message, []
            return
        if message["type"] == "http.response.body" and "start" in held:
            held["body"].append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _clean(b"".join(held["body"]))
            start = dict(held.pop("start"))
            start["headers"] = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            start["headers"].append((b"content-length", str(len(body)).encode()))
            await send(start)
            return await send({"type": "http.response.body", "body": body})
        await send(message)
    return wrapped


def _forget_this_package() -> None:
    """Drop cladapter_core from sys.modules so that MLflow loads the model with the copy of
    the package the model carries (its code_paths, put first on sys.path), as `mlflow
    models serve` does; this module keeps what it already holds."""
    for name in [m for m in sys.modules if m == "cladapter_core" or m.startswith("cladapter_core.")]:
        del sys.modules[name]


def create_app():
    """The ASGI app of one uvicorn worker: MLflow's scoring app for the model at
    $__pyfunc_model_path__ (set by `main`, read by MLflow) behind `Guard`."""
    s = settings()
    _forget_this_package()
    from mlflow.pyfunc.scoring_server import app as scoring  # loads the model
    log.info("scoring server: bodies up to %s bytes, %s", f"{s.serve_max_bytes:,}",
             "a bearer token on /invocations" if s.serve_token else "no token")
    return Guard(scoring.app, s.serve_max_bytes, s.serve_token)


def command(local_model: str, host: str, port: int, workers: int, timeout: int | None = None):
    """MLflow's own uvicorn command and environment for a downloaded model, serving
    `create_app` instead of MLflow's bare app."""
    from mlflow.pyfunc import scoring_server
    line, env = scoring_server.get_cmd(local_model, port, host, timeout, workers)
    argv = shlex.split(line)
    if argv[0] != "uvicorn" or argv[-1] != MLFLOW_APP:  # a newer MLflow serves differently
        raise RuntimeError(f"unexpected scoring server command from this MLflow: {line}")
    env["PYTHONPATH"] = ":".join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", "uvicorn", *argv[1:-1], "--factory", THIS_APP], env


def main(argv: list[str] | None = None) -> None:
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    from ..console import configure
    p = argparse.ArgumentParser(prog="python -m cladapter_core.serving.server",
                                description="`mlflow models serve --env-manager local` with a "
                                            "request-size limit, an optional bearer token and "
                                            "error bodies without tracebacks (docs/serving.md)")
    p.add_argument("--model-uri", required=True, help="models:/<name>/<version>, runs:/, a folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--timeout", type=int, default=None, help="seconds per request (MLflow's default)")
    args = p.parse_args(argv)
    configure()
    local = _download_artifact_from_uri(args.model_uri)
    cmd, env = command(local, args.host, args.port, args.workers, args.timeout)
    log.info("serving %s (%s) on http://%s:%d", args.model_uri, local, args.host, args.port)
    os.execve(cmd[0], cmd, env)  # uvicorn replaces this process: signals reach it directly


if __name__ == "__main__":
    main()
