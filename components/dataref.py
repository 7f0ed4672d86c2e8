"""Data by reference: the Dataset artifact that `prepare` hands to the other steps holds
prepare's small outputs and points to the files; a step that reads images fetches only
the files of the splits it reads, onto its own ephemeral volume.

The artifact (a folder; KFP uploads it to the pipeline root and every consumer's
launcher downloads it whole, so it must stay small):

    prepared/       manifest.csv, classes.json, summary.json: prepare's outputs; the
                    summary's `root` is `../source/<root>`, where `fetch` puts the files
    source.json     where the files are: kind (s3, dvc, demo, folder), uri, path, rev
                    (a DVC revision as the commit SHA it resolved to), root (the
                    manifest's root inside the source), files and bytes in all
    files.csv       one line per file an item of the manifest needs (an image, or every
                    frame of a frame folder): item (the manifest's path), file (its path
                    under the source), bytes, etag (S3: the object's ETag when prepared)

`fetch(dataset_dir, splits, dest)` rebuilds `dest/prepared` + `dest/source/...` with only
the files of `splits`: S3 objects by key with `If-Match` on the ETag prepare saw (an
object changed since is an error, not silently other data); DVC files at the pinned
commit through `dvc.api.DVCFileSystem` (one clone, then only those files from the
remote); the demo digits regenerated locally; a local folder (run-local only) linked,
not copied. With `data.resize`, prepare's resized copies are its output and travel in
the artifact itself (`summary.json` `copied: true`); the artifact is then
self-contained and `fetch` returns it as it is, as for artifacts of the older layout
(`source/` inside).

Containment, copied or not: every file the artifact names or carries lies under the
dataset (`dataset_uri`), symlinks followed; prepare's `summary.json` `outside_root` lists
what `data.allow_outside_root` let it read from elsewhere, and the artifact refuses it.
files.csv's cells are written spreadsheet-safe (`outputs.csv_path_cell`). Nothing here
imports kfp.
"""
from __future__ import annotations

import csv
import json
import os
import posixpath
import shutil
from pathlib import Path

from cladapter_core import storage
from cladapter_core.errors import DataError

PREPARED = "prepared"       # inside the artifact: prepare's output
SOURCE = "source"           # where `fetch` puts the files (beside prepared/)
SOURCE_REF = "source.json"  # where the files are
FILES = "files.csv"         # which files each manifest item needs
FILE_COLUMNS = ["item", "file", "bytes", "etag"]


# -- written by prepare ----------------------------------------------------------------------
def write(prepared: Path, base: Path, out_dir: Path, ref: dict, etags: dict | None = None) -> dict:
    """The artifact in `out_dir` for `prepared` (made by prepare from files under `base`,
    the local copy of the source or the folder itself): prepared/ with its root pointing
    at `../source/<root>`, files.csv, and `ref` completed into source.json. Returns the
    completed ref."""
    from cladapter_core.outputs import csv_path_cell, write_json
    prepared, out_dir = Path(prepared), Path(out_dir)
    summary = json.loads((prepared / "summary.json").read_text())
    base_r = Path(base).resolve()
    for path in summary.get("outside_root") or []:  # the same rule for copies as for references
        _under(Path(path), base_r, "file")
    ref = dict(ref)
    if summary.get("copied"):  # data.resize: prepare's own resized copies, in the artifact
        shutil.copytree(prepared, out_dir / PREPARED, dirs_exist_ok=True)
        ref.update(root=".", files=0, bytes=0, by_reference=False)
        write_json(out_dir / SOURCE_REF, ref)
        return ref
    root = Path(os.path.normpath((prepared / summary["root"]).resolve()))
    rel_root = _under(root, base_r, "the manifest's root")
    rows = index(prepared, root, base_r, etags or {})  # checked before anything is written
    shutil.copytree(prepared, out_dir / PREPARED, dirs_exist_ok=True)
    summary["root"] = posixpath.normpath(f"../{SOURCE}/{rel_root}")
    if ref.get("kind") != "folder":  # not the prepare pod's scratch path, which is gone
        summary["source_root"] = "/".join(x for x in (ref.get("uri", "").rstrip("/"), rel_root) if x and x != ".")
    write_json(out_dir / PREPARED / "summary.json", summary)
    with open(out_dir / FILES, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FILE_COLUMNS)
        writer.writeheader()
        writer.writerows({**r, "item": csv_path_cell(r["item"]), "file": csv_path_cell(r["file"])} for r in rows)
    ref.update(root=rel_root, files=len(rows), bytes=sum(r["bytes"] for r in rows), by_reference=True)
    write_json(out_dir / SOURCE_REF, ref)
    return ref


def _under(path: Path, base: Path, what: str) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        raise DataError(f"{what} {path} lies outside the dataset ({base}): a pipeline's Dataset "
                        "artifact only names or carries files under dataset_uri") from None


def index(prepared: Path, root: Path, base: Path, etags: dict) -> list[dict]:
    """files.csv's rows: every file each manifest item needs, as a path under `base`."""
    rows = []
    with open(prepared / "manifest.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            item = Path(os.path.normpath(root / row["path"]))
            files = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
            for f in files:
                what = f"file {row['path']!r} of the manifest"
                _under(f.resolve(), base, what)  # where the bytes are: a symlink must not lead out
                rel = _under(f, base, what)
                rows.append({"item": row["path"], "file": rel, "bytes": f.stat().st_size,
                             "etag": etags.get(rel, "")})
    return rows


# -- read by the steps -----------------------------------------------------------------------
def read_ref(dataset_dir) -> dict | None:
    path = Path(dataset_dir) / SOURCE_REF
    return json.loads(path.read_text()) if path.is_file() else None


def by_reference(dataset_dir) -> bool:
    """Does the artifact point to its files (rather than carry them)?"""
    ref = read_ref(dataset_dir) or {}
    return bool(ref.get("by_reference")) and not (Path(dataset_dir) / SOURCE).is_dir()


def needed(dataset_dir, splits=None) -> list[dict]:
    """files.csv's rows for the items of `splits` (None: every split)."""
    dataset_dir = Path(dataset_dir)
    with open(dataset_dir / PREPARED / "manifest.csv", newline="", encoding="utf-8") as fh:
        items = {r["path"] for r in csv.DictReader(fh) if splits is None or r["split"] in splits}
    with open(dataset_dir / FILES, newline="", encoding="utf-8") as fh:
        # `file` is a key under the source: './' (spreadsheet-safe cells) is not part of it
        return [{**r, "file": posixpath.normpath(r["file"])} for r in csv.DictReader(fh) if r["item"] in items]


def fetch(dataset_dir, splits, dest) -> tuple[Path, dict]:
    """A prepared folder whose files of `splits` (None: all) are at hand, built under
    `dest`; returns (its path, {"files", "bytes", "how"}): the files and bytes fetched."""
    dataset_dir, dest = Path(dataset_dir), Path(dest)
    if not by_reference(dataset_dir):
        return dataset_dir / PREPARED, {"files": 0, "bytes": 0, "how": "in the artifact"}
    ref = read_ref(dataset_dir)
    rows = needed(dataset_dir, splits)
    shutil.copytree(dataset_dir / PREPARED, dest / PREPARED)
    target = dest / SOURCE
    kind = ref["kind"]
    if kind == "folder":
        target.symlink_to(Path(storage.local_path(ref["uri"])).resolve(), target_is_directory=True)
        return dest / PREPARED, {"files": 0, "bytes": 0, "how": f"linked to {ref['uri']}"}
    if kind == "demo":
        from cladapter_core.data import make_demo_data
        make_demo_data(target)
        return dest / PREPARED, {"files": 0, "bytes": 0, "how": "demo digits generated here"}
    target.mkdir(parents=True)
    if kind == "s3":
        _fetch_s3(ref["uri"], rows, target)
    elif kind == "dvc":
        _fetch_dvc(ref["uri"], ref["rev"], rows, target)
    else:
        raise DataError(f"{dataset_dir / SOURCE_REF}: unknown source kind {kind!r}")
    return dest / PREPARED, {"files": len(rows), "bytes": sum(int(r["bytes"]) for r in rows),
                             "how": f"{kind} {ref['uri']}"}


def _fetch_s3(uri: str, rows: list[dict], target: Path) -> None:
    """`rows`' files under the S3 prefix `uri`, each with the ETag prepare saw (an object
    changed since is refused)."""
    etags = {r["file"]: r["etag"] for r in rows if r.get("etag")}
    try:
        storage.copy_tree(uri, target, files=[r["file"] for r in rows], etags=etags)
    except storage.Changed as e:
        raise DataError(f"{e.uri} changed since this run prepared it (ETag {e.etag}): the prepared "
                        "manifest no longer describes it; run again without the cache (submit --no-cache)") from None
    except storage.NotFound as e:
        raise DataError(f"{e.uri} was deleted since this run prepared it") from None
    except storage.StorageError as e:
        raise DataError(f"cannot read {e.uri}: {e.reason} (check the cladapter-s3 credentials "
                        "and AWS_ENDPOINT_URL)") from e


def _fetch_dvc(repo: str, rev: str, rows: list[dict], target: Path) -> None:
    """Only `rows`' files of the DVC repository at commit `rev` (from its remote)."""
    from dvc.api import DVCFileSystem
    try:
        fs = DVCFileSystem(storage.local_path(repo), rev=rev or None)
        for row in rows:
            local = target / row["file"]
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(row["file"], str(local))
    except Exception as e:  # noqa: BLE001 - dvc's own errors are many and not exported
        raise DataError(f"cannot read the data of {repo} at {rev}: {type(e).__name__}: {e}") from e
