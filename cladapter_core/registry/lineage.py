"""`lineage`: where a registered model came from, and its one-screen description."""
from __future__ import annotations

from datetime import datetime, timezone

from .. import tracking
from .model_cache import model_version
from .versions import _client, _describe


def lineage(model_uri: str) -> dict:
    """The chain behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: the
    registered version (aliases, tags, test metrics), its run, the git commit, the data
    hash, the parameters, and the other stage runs of the same pipeline execution.
    Uses the tracking URI as configured (``tracking.configure``)."""
    from mlflow.entities import ViewType

    client = _client()
    mv = model_version(model_uri, client)
    with tracking.errors(f"looking up {model_uri}"):
        out = {"model_uri": model_uri, "model": _describe(mv), "run": None,
               "git_commit": mv.tags.get("git_commit"), "data_hash": mv.tags.get("data_hash"),
               "model_hash": mv.tags.get("model_hash"), "params": {}, "pipeline": None}
        if not mv.run_id:
            return out
        run = client.get_run(mv.run_id)
        t = run.data.tags
        out["run"] = {"run_id": run.info.run_id, "name": run.info.run_name,
                      "stage": t.get("stage"), "status": run.info.status,
                      "experiment_id": run.info.experiment_id,
                      "artifact_uri": run.info.artifact_uri,
                      "start": _ms(run.info.start_time), "end": _ms(run.info.end_time)}
        out["git_commit"] = out["git_commit"] or t.get("git_commit")
        out["git_dirty"] = t.get("git_dirty")
        out["data_hash"] = out["data_hash"] or t.get("data_hash")
        out["params"] = dict(sorted(run.data.params.items()))
        parent = t.get("mlflow.parentRunId")
        if parent:
            children = client.search_runs([run.info.experiment_id],
                                          f"tags.`mlflow.parentRunId` = '{parent}'",
                                          run_view_type=ViewType.ACTIVE_ONLY, max_results=200)
            out["pipeline"] = {
                "pipeline_id": t.get(tracking.PIPELINE_TAG), "parent_run_id": parent,
                "stages": [{"stage": c.data.tags.get("stage"), "run_id": c.info.run_id,
                            "status": c.info.status, "start": _ms(c.info.start_time)}
                           for c in sorted(children, key=lambda c: c.info.start_time)]}
    return out


def _ms(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


def format_lineage(info: dict) -> str:
    """A printable form of ``lineage()``."""
    mv, run = info["model"], info["run"]
    lines = [f"{info['model_uri']}  ->  {mv['name']} v{mv['version']}"
             + (f"  [{', '.join(mv['aliases'])}]" if mv["aliases"] else ""),
             "  metrics:    " + (", ".join(f"{k}={v:.4f}" for k, v in sorted(mv["metrics"].items()))
                                 or "-"),
             f"  source:     {mv['source']}"]
    if run:
        lines.append(f"  run:        {run['run_id']} ({run['name']}, {run['status']})")
    lines += [f"  git commit: {info.get('git_commit') or '-'}"
              + (" (dirty)" if info.get("git_dirty") == "true" else ""),
              f"  data hash:  {info.get('data_hash') or '-'}",
              f"  model hash: {info.get('model_hash') or '-'}"]
    if info.get("pipeline"):
        p = info["pipeline"]
        lines.append(f"  pipeline:   {p['pipeline_id']} (parent run {p['parent_run_id']})")
        lines += [f"    - {s['stage']}: {s['run_id']} {s['status']}" for s in p["stages"]]
    if info["params"]:
        lines.append("  params:")
        lines += [f"    {k} = {v}" for k, v in info["params"].items()]
    return "\n".join(lines)
