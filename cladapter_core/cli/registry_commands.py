"""The handlers of the registry and serving subcommands (register, promote, lineage,
serve, summary)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..settings import export, settings
from .commands import _load, _print_metrics


def _write_json(path, obj) -> None:
    from ..outputs import atomic_write
    if path:
        atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def cmd_register(args):
    from .. import registry, tracking
    params = _load(args)
    tracking.check_tracking()
    result = registry.register_and_promote(args.model, args.eval, params, prepared_dir=args.prepared,
                                           promote_now=args.promote or None)
    reg = result["registration"]
    state = "registered" if reg["created"] else "already registered"
    print(f"{state}: {reg['name']} version {reg['version']} (aliases: {', '.join(reg['aliases'])}; "
          f"run {reg['run_id']})")
    if "promotion" in result:
        _print_promotion(result["promotion"], dry_run=False)
    _write_json(args.out, result)


def _print_promotion(res: dict, dry_run: bool) -> None:
    print(f"promotion of {res['model_name']} v{res['candidate']} ({res['metric']} "
          f"{res['candidate_value']}): {res['decision']} - {res['reason']}")
    print(f"champion {'would be' if dry_run else 'is now'}: v{res['champion_after']}")


def cmd_promote(args):
    from .. import tracking
    params = _load(args)
    tracking.check_tracking(existing=True)  # reads the registry: never create an empty store
    from .. import registry
    res = registry.promote(params, dry_run=args.dry_run, version=args.version, prepared_dir=args.prepared)
    _print_promotion(res, args.dry_run)
    _write_json(args.out, res)


def cmd_lineage(args):
    import mlflow

    from .. import registry, tracking
    mlflow.set_tracking_uri(tracking.check_tracking(existing=True))
    info = registry.lineage(args.model_uri)
    print(json.dumps(info, indent=2, sort_keys=True, default=str) if args.json
          else registry.format_lineage(info))


def cmd_serve(args):
    import shlex

    import mlflow

    from .. import registry, tracking
    from ..serving import pyfunc as serving
    params = _load(args)
    # `mlflow models serve` starts `uvicorn` from PATH: this environment's, also unactivated.
    export(path=os.pathsep.join([str(Path(sys.executable).parent), settings().path]))
    wanted = args.model_uri or f"models:/{params['register']['model_name']}@champion"
    if registry.is_model_uri(wanted):
        uri = tracking.check_tracking(existing=True)  # reads the registry: never create a store
        mlflow.set_tracking_uri(uri)
        export(mlflow_tracking_uri=uri)
        # Served from the verified local copy: the server never downloads (or runs) anything
        # the integrity check did not see.
        local, mv = registry.verified_model(wanted)
        name, served = mv["model_uri"], str(local)
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(mv["metrics"].items()))
        print(f"{wanted} is {mv['name']} version {mv['version']} (run {mv['run_id']}"
              f"{'; ' + metrics if metrics else ''})")
        print(f"its files match the record made at registration; verified copy: {served}")
    else:
        name = served = str(registry.pyfunc_of_folder(wanted))
        print(f"{wanted} is a model folder, served as the MLflow model {served} (not registered)")
    cmd = serving.serve_command(served, args.host, args.port, args.workers, args.env_manager)
    print(f"serving {name} on http://{args.host}:{args.port}/invocations")
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if not args.dry_run:
        os.execv(cmd[0], cmd)  # the server replaces this process: signals reach it directly


def cmd_verify_model(args):
    """Download a registered version, check every file against its integrity record, and
    with --out place the verified copy there (what a server then loads). Exit 2 when refused."""
    import tempfile

    import mlflow

    from .. import registry, tracking
    from ..errors import CLAdapterError
    mlflow.set_tracking_uri(tracking.check_tracking(existing=True))
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLAdapterError(f"--out {out}: exists and is not an empty folder; give a new one")
    if out is None:
        local, mv = registry.verified_model(args.model_uri)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
            local, mv = registry.verified_model(args.model_uri, cache_dir=tmp)
            if out.exists():
                out.rmdir()
            os.replace(local, out)  # in one step: a server never sees half a model
        local = out
    files = sum(1 for p in local.rglob("*") if p.is_file())
    print(f"{args.model_uri} is {mv['name']} version {mv['version']}: its {files} files match the record "
          f"made at registration (integrity.sha256 {mv['tags'].get('integrity.sha256', '')[:16]}...); "
          f"verified copy: {local}")


def cmd_summary(args):
    from ..errors import CLAdapterError as Err
    root = Path(args.out)
    metrics_path, reg_path = root / "eval" / "metrics.json", root / "registry.json"
    if not metrics_path.is_file():
        raise Err(f"{metrics_path}: not found; run `dvc repro` (or `make demo`) first")
    _print_metrics(json.loads(metrics_path.read_text()), f"test metrics ({metrics_path}):")
    if reg_path.is_file():
        reg = json.loads(reg_path.read_text())
        r, pr = reg.get("registration", {}), reg.get("promotion")
        print(f"registered model: {r.get('name')} version {r.get('version')} "
              f"(aliases: {', '.join(r.get('aliases') or []) or 'none'})")
        if pr:
            print(f"promotion: {pr['decision']} - {pr['reason']}; champion is v{pr['champion_after']}")
    report = root / "eval" / "report.html"
    if report.is_file():
        print(f"report: {report}")
    uri = settings().tracking_uri
    print(f"browse the runs: .venv/bin/mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")


