"""What the KFP components' bodies call: each function here is one stage as a pipeline
step runs it, built from the same `cladapter_core` functions the CLI and `dvc repro` call.

- `resolve_params`: the pipeline's parameters -> the resolved, validated params dict.
- `fetch_source` + `prepare_task`: the dataset (demo, `s3://` prefix, DVC repository,
  local folder) prepared by reference: the Dataset artifact holds the manifest, classes,
  summary and where the files are (`components.dataref`), not the files.
- `local_data`: the files of the splits a step reads, fetched onto its scratch volume.
- `train_task`: one training stage inside an MLflow stage run; torchrun when it has
  several GPUs; its checkpoint mirrored under the run-scoped `<checkpoint root>/<KFP run
  id>/<stage>/` (`checkpoint_root`) so a retried pod (a new node with an empty disk)
  resumes from it.
- `tune_task`: the Optuna search (or none), returning the params training uses.
- `evaluate_task`, `register_task`, `promote_task`.

Nothing here imports kfp: the components translate artifacts to paths and back.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from cladapter_core import storage
from cladapter_core import identity
from cladapter_core.errors import CLAdapterError, DataError, ParamsError
from cladapter_core.settings import exported, tracking_on
from components import dataref

# Pipeline parameter -> params.yaml field. stage2_lr is turned into stage2.lr_factor.
PARAM_FIELDS = {
    "seed": "seed",
    "backbone": "model.backbone",
    "backbone_kwargs": "model.backbone_kwargs",
    "pretrained": "model.pretrained",
    "checkpoint_uri": "model.checkpoint",
    "num_centers": "model.num_centers",
    "batch_size": "train.batch_size",
    "stage1_epochs": "stage1.epochs",
    "stage1_lr": "train.lr",
    "stage2_epochs": "stage2.epochs",
    "model_name": "register.model_name",
    "promotion_margin": "register.margin",
    "auto_promote": "register.auto_promote",  # promote only when true (the condition around promote)
}
DERIVED_FIELDS = {"stage2.lr_factor": "stage2_lr", "data.source": "dataset_uri"}
# The Dataset artifact's layout (components/dataref.py): prepare's output, where the
# files are (uri, path, revision as a SHA), and where a step puts the files it fetches.
PREPARED, SOURCE, SOURCE_REF = dataref.PREPARED, dataref.SOURCE, dataref.SOURCE_REF
CKPT_FILE = "last.pt"
SYNC_ENV = "CLADAPTER_CHECKPOINT_SYNC_S"
# Secret keys a deployment may leave empty: the Secrets always hold every key (the oldest
# supported KFP backend cannot mark a key optional), and an empty value means "not set".
OPTIONAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ENDPOINT_URL",
                "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "CLADAPTER_TUNE_STORAGE",
                "CLADAPTER_CHECKPOINT_ROOT")


def drop_empty_env(names=OPTIONAL_ENV) -> list[str]:
    """Unset the variables of `names` that are set but empty (boto3 and MLflow would take
    an empty endpoint or region for a real one); returns those unset."""
    dropped = [n for n in names if n in os.environ and not os.environ[n].strip()]
    for n in dropped:
        del os.environ[n]
    return dropped


def use_scratch() -> str | None:
    """Temporary files (downloads, torchrun's params) on the step's ephemeral volume,
    `$CLADAPTER_SCRATCH`, when it is mounted (not under kfp.local)."""
    folder = os.environ.get("CLADAPTER_SCRATCH", "")
    if folder and os.path.isdir(folder) and os.access(folder, os.W_OK):
        tempfile.tempdir = folder
        return folder
    return None


def start_step() -> None:
    """A pipeline step's set-up, the first call of every component body (importing this
    module changes nothing): Secret keys left empty unset, temporary files on the step's
    scratch volume, the library's log lines in the pod's log."""
    from cladapter_core.console import configure
    configure()
    drop_empty_env()
    use_scratch()


# -- params ------------------------------------------------------------------------------
def split_overrides(text: str) -> list[str]:
    """`"a.b=1; c.d=x"` or one `key=value` per line -> ["a.b=1", "c.d=x"]."""
    items = []
    for line in (text or "").replace(";", "\n").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            items.append(line)
    return items



def _merge_into(node: dict, new: dict) -> None:
    """`new` set over `node` in place, section by section; backbone_kwargs replaced whole."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict) and key != "backbone_kwargs":
            _merge_into(node[key], value)
        else:
            node[key] = value


def resolve_params(values: dict, params_overrides: str = "", base: dict | None = None) -> dict:
    """The full params dict of a pipeline run: `base` (the params file the pipeline was
    compiled from; None: the embedded defaults), then `params_overrides`
    (`section.key=value` items for anything the pipeline has no parameter for, e.g.
    `data.shots_per_class=12`), then the pipeline's parameters in `values`.

    Raises ParamsError listing every problem; an override of a field that a pipeline
    parameter sets is refused (it would be silently overwritten).
    """
    from cladapter_core.params import load_params, parse_overrides

    extra = split_overrides(params_overrides)
    known = PARAM_FIELDS
    fields = {**{v: k for k, v in known.items()}, **DERIVED_FIELDS}
    for item in extra:
        key = item.split("=", 1)[0].strip()
        if key in fields:
            raise ParamsError(f"params_overrides: {key} is set by the pipeline parameter "
                              f"{fields[key]!r}; change that parameter instead")
    layered = json.loads(json.dumps(base)) if base else {}
    _merge_into(layered, parse_overrides(extra))
    given: dict = {}
    for name, field in known.items():
        if name in values:
            value = values[name]
            if name == "checkpoint_uri" and not value:
                value = None  # the UI cannot send null: "" means no checkpoint
            given[field] = value
    lr1, lr2 = values.get("stage1_lr"), values.get("stage2_lr")
    if lr2 is not None:
        if not isinstance(lr1, (int, float)) or not lr1 > 0 or not isinstance(lr2, (int, float)) or not lr2 > 0:
            raise ParamsError(f"stage1_lr and stage2_lr must be numbers > 0, got {lr1!r} and {lr2!r}")
        # stage-2 lr = train.lr * stage2.lr_factor; 12 digits keep 1e-4 / 1e-3 == 0.1 exactly
        given["stage2.lr_factor"] = float(f"{lr2 / lr1:.12g}")
    if values.get("dataset_uri"):
        given["data.source"] = str(values["dataset_uri"])
    if isinstance(given.get("model.backbone_kwargs"), dict):
        given["model.backbone_kwargs"] = _whole_numbers_as_int(given["model.backbone_kwargs"])
    for field, value in given.items():
        node = layered
        *parents, last = field.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    # Tuned values come from the pipeline's tune steps, never from a file on the pod.
    return load_params(None, layered, use_best=False)


def _whole_numbers_as_int(value):
    """KFP carries a dict parameter as a protobuf Struct, whose numbers are all floats:
    {img_size: 32} arrives as {img_size: 32.0}, which timm's size arithmetic refuses."""
    if isinstance(value, dict):
        return {k: _whole_numbers_as_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_int(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def data_part(params: dict) -> dict:
    """What prepare reads (`seed`, `data`): prepare's cache key depends on nothing else."""
    return {"seed": params["seed"], "data": params["data"]}


def params_from_json(text: str) -> dict:
    """A params JSON passed between steps, validated again (it may have been edited)."""
    from cladapter_core.params import load_params
    try:
        given = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParamsError(f"params JSON from the previous step is not valid JSON ({e})") from e
    if not isinstance(given, dict):
        raise ParamsError("params JSON from the previous step must be a mapping")
    return load_params(None, given, use_best=False)


# -- the dataset ---------------------------------------------------------------------------
def _is_dvc_repo_url(uri: str) -> bool:
    return uri.startswith(("git@", "git://", "ssh://", "http://", "https://")) or uri.endswith(".git")


def fetch_source(dataset_uri: str, dataset_path: str, dataset_rev: str, dest: Path) -> Path:
    """Copy the dataset into `dest` and return the folder or CSV to prepare.

    `dataset_uri`: `demo` (the bundled digit scans), `s3://bucket/prefix` (every object
    under the prefix; `dataset_path` picks a file or folder inside it, e.g. a CSV
    manifest), a DVC repository (git URL or local repository; `dataset_path` is the path
    in it, `dataset_rev` a branch, tag or commit), or a local folder.
    """
    return _fetch(dataset_uri, dataset_path, dataset_rev, dest)[1]


def _fetch(dataset_uri: str, dataset_path: str, dataset_rev: str, dest: Path,
           copy_folder: bool = True) -> tuple[Path, Path, dict]:
    """`fetch_source`, returning (base, what to prepare, S3 ETags): `base` is the folder
    the source's files are named under in the artifact (the S3 prefix's or the DVC
    repository's root, or the local folder itself when `copy_folder` is false)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    uri = (dataset_uri or "").strip()
    path = (dataset_path or "").strip().strip("/")
    rev = (dataset_rev or "").strip()
    if not uri:
        raise DataError("dataset_uri is empty: give `demo`, an s3:// prefix, a DVC repository or a folder")
    if uri == "demo":
        from cladapter_core.data import make_demo_data
        return dest, make_demo_data(dest), {}
    if storage.scheme(uri) == "s3":
        etags = _download_prefix(uri, dest)
        return dest, _inside(dest, path, uri), etags
    local = Path(storage.local_path(uri))
    if _is_dvc_repo_url(uri) or rev or (local.is_dir() and (local / ".dvc").is_dir()):
        if not path:
            raise DataError(f"dataset_uri {uri} is a DVC repository: set dataset_path to the "
                            "data's path in it (e.g. data/images)")
        return dest, _dvc_get(uri, path, resolve_rev(uri, rev), dest), {}
    if not local.is_dir():
        raise DataError(f"dataset_uri {uri}: not `demo`, an s3:// prefix, a DVC repository "
                        "or an existing folder")
    if not copy_folder:
        return local, _inside(local, path, uri), {}
    try:
        storage.copy_tree(local, dest)
    except storage.StorageError as e:
        raise DataError(f"dataset_uri {uri}: {e}") from e
    return dest, _inside(dest, path, uri), {}


def _inside(root: Path, path: str, uri: str) -> Path:
    target = root / path if path else root
    if not target.exists():
        raise DataError(f"dataset_path {path!r}: not found in {uri}")
    return target


def _download_prefix(uri: str, dest: Path) -> dict[str, str]:
    """Every object under the prefix into `dest`; returns {path under the prefix: ETag}."""
    if not urlparse(uri).netloc:
        raise DataError(f"dataset_uri {uri}: no bucket (expected s3://bucket/prefix)")
    try:
        listing = storage.list_files(uri)
        for rel in listing:
            if ".." in PurePosixPath(rel).parts:
                raise DataError(f"{uri}: object key {rel!r} escapes the prefix")
        if listing:
            storage.copy_tree(uri, dest, files=listing)
    except storage.StorageError as e:
        raise DataError(f"cannot download {e.uri}: {e.reason} (check the cladapter-s3 credentials "
                        "and AWS_ENDPOINT_URL)") from e
    if not listing:
        raise DataError(f"no objects under {uri} (looked for {uri.rstrip('/')}/*)")
    return {rel: entry["etag"] for rel, entry in listing.items()}


def _dvc_get(repo: str, path: str, rev: str, dest: Path) -> Path:
    if shutil.which("git") is None:
        raise DataError(f"reading {path} from the DVC repository {repo} needs `git`, which "
                        "is not installed here")
    out = dest / path  # under the repository's own layout: files.csv names them as DVC does
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dvc", "get", repo, path, "-o", str(out)]
    if rev:
        cmd += ["--rev", rev]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})  # a pod does not phone home
    if proc.returncode != 0:
        raise DataError(f"dvc get {repo} {path}{' --rev ' + rev if rev else ''} failed: "
                        f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return out


def resolve_rev(repo: str, rev: str) -> str:
    """A DVC repository's revision (branch, tag, empty: the default branch) as the commit
    SHA it points to now, so every later step and the run's tags name the same data."""
    rev = (rev or "").strip()
    if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev.lower()):
        return rev
    if shutil.which("git") is None:
        raise DataError(f"resolving revision {rev or 'HEAD'} of {repo} needs `git`, which is not installed here")
    proc = subprocess.run(["git", "ls-remote", repo, rev or "HEAD"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    lines = [ln.split() for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise DataError(f"revision {rev or 'HEAD'} of the DVC repository {repo}: not found "
                        f"({(proc.stderr or '').strip()[-500:] or 'no such branch or tag'})")
    # a tag may be listed twice (`v1` and the commit it points to, `v1^{}`): take the commit
    peeled = [sha for sha, ref in lines if ref.endswith("^{}")]
    return peeled[0] if peeled else lines[0][0]


def source_ref(dataset_uri: str, dataset_path: str, dataset_rev: str) -> dict:
    """Where a dataset's files are: kind (demo, s3, dvc, folder), uri, path, and for a
    DVC repository the revision as a commit SHA."""
    uri, path = (dataset_uri or "").strip(), (dataset_path or "").strip().strip("/")
    local = Path(storage.local_path(uri))
    if uri == "demo":
        kind = "demo"
    elif storage.scheme(uri) == "s3":
        kind = "s3"
    elif _is_dvc_repo_url(uri) or dataset_rev.strip() or (local.is_dir() and (local / ".dvc").is_dir()):
        kind = "dvc"
    else:
        kind = "folder"
    ref = {"kind": kind, "uri": uri, "path": path, "rev": ""}
    if kind == "dvc":
        ref["rev"] = resolve_rev(uri, dataset_rev)
    return ref


def read_source_ref(dataset_dir) -> dict | None:
    return dataref.read_ref(dataset_dir)


def dataset_metadata(dataset_dir, summary: dict) -> dict:
    """What the KFP UI shows on the Dataset artifact."""
    ref = read_source_ref(dataset_dir) or {}
    return {"source": ref.get("uri"), "dataset_path": ref.get("path"), "dataset_rev": ref.get("rev"),
            "num_classes": summary["num_classes"], "classes": summary["classes"], **summary["totals"],
            "leaks": summary["num_leaks"], "skipped": len(summary["skipped"]),
            "files": ref.get("files"), "bytes": ref.get("bytes"), "data_hash": identity.data_hash(artifact_prepared(dataset_dir))}


def prepare_task(dataset_uri: str, dataset_path: str, dataset_rev: str, params: dict,
                 out_dir) -> dict:
    """Prepare the dataset into the Dataset artifact `out_dir` by reference
    (`components.dataref`): the files are fetched onto this step's scratch volume (a
    local folder is read where it is), prepared there, and only the manifest, classes,
    summary, the list of files and where they are (`source.json`: URI, path, a DVC
    revision as its SHA) go into the artifact."""
    from cladapter_core.data import prepare
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref = source_ref(dataset_uri, dataset_path, dataset_rev)
    with tempfile.TemporaryDirectory(prefix="cladapter-prepare-") as tmp:
        work = Path(tmp)
        base, source, etags = _fetch(dataset_uri, dataset_path, ref["rev"] or dataset_rev, work / SOURCE,
                                     copy_folder=False)
        summary = prepare(source, work / PREPARED, params,
                          name=identity.dataset_name(params))  # the run's dataset_uri, as every step names it
        ref = dataref.write(work / PREPARED, base, out_dir, ref, etags)
    print(f"prepared by reference: {ref.get('files')} files ({ref.get('bytes')} bytes) stay at "
          f"{ref['uri']}{'/' + ref['path'] if ref.get('path') else ''}; the artifact holds the manifest")
    return summary


def artifact_prepared(dataset_dir) -> Path:
    """The artifact's own prepared folder (manifest, classes, summary; maybe no files)."""
    path = Path(dataset_dir) / PREPARED
    if not (path / "manifest.csv").is_file():
        raise DataError(f"{dataset_dir}: not a prepared Dataset artifact (no {PREPARED}/manifest.csv)")
    return path


@contextlib.contextmanager
def local_data(dataset_dir, splits=None):
    """A prepared folder with the files of `splits` (None: all) fetched onto this step's
    scratch volume (`dataref.fetch`), removed on the way out."""
    artifact_prepared(dataset_dir)
    if not dataref.by_reference(dataset_dir):
        yield Path(dataset_dir) / PREPARED
        return
    tmp = Path(tempfile.mkdtemp(prefix="cladapter-data-"))
    try:
        prepared, got = dataref.fetch(dataset_dir, splits, tmp)
        print(f"data: {got['files']} files, {got['bytes']} bytes of split(s) "
              f"{', '.join(splits) if splits else 'all'} ({got['how']})")
        yield prepared
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepared_dir(dataset_dir) -> Path:
    """A prepared folder with every split's files at hand: the artifact's own when it
    carries them, else fetched once (all splits) into a temporary folder removed when
    this process exits. Steps that read some splits use `local_data` instead."""
    path = artifact_prepared(dataset_dir)
    if not dataref.by_reference(dataset_dir):
        return path
    stack = contextlib.ExitStack()
    atexit.register(stack.close)
    return stack.enter_context(local_data(dataset_dir))


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


# -- checkpoints that outlive the pod ------------------------------------------------------
CHECKPOINT_ROOT_ENV = "CLADAPTER_CHECKPOINT_ROOT"  # the install's default (ConfigMap cladapter-pipeline)
NO_CHECKPOINT = ("none", "off", "false")


def checkpoint_root(checkpoint_prefix: str = "") -> str | None:
    """Where a training step mirrors its checkpoint: `checkpoint_prefix` when given
    (`none`: nowhere), else the install's `$CLADAPTER_CHECKPOINT_ROOT` (every install
    overlay sets it, e.g. `s3://mlflow/checkpoints`); the step adds `<KFP run id>/<stage>/`
    to it, so it is run-scoped. None: no mirror, a retried step starts its stage over."""
    given = (checkpoint_prefix or "").strip()
    if given.lower() in NO_CHECKPOINT:
        return None
    root = given or os.environ.get(CHECKPOINT_ROOT_ENV, "").strip()
    if not root:
        print(f"no checkpoint_prefix and no ${CHECKPOINT_ROOT_ENV}: the checkpoint stays on this pod; "
              "a retried step starts its stage over")
    return root or None


class CheckpointStore:
    """The trainer's checkpoint (`<out>.ckpt/last.pt`) mirrored at
    `<prefix>/<pipeline id>/<stage>/last.pt`, an `s3://` prefix or a folder.

    A retried step is a new pod, maybe on another node, with an empty disk: `restore`
    fetches the mirrored checkpoint so `train` resumes from it (it resumes only a
    checkpoint whose params, data and starting weights match). `watch` copies the
    checkpoint each time the trainer rewrites it (every epoch; at SIGTERM mid-epoch);
    `clear` removes it once the stage is done. A failed copy is warned about and
    retried: it never stops training.
    """

    def __init__(self, prefix: str, pipeline_id: str, stage: str):
        if not pipeline_id:
            raise ParamsError("checkpoint_prefix needs the pipeline run id to keep runs apart")
        self.prefix = prefix.rstrip("/")
        self.key = f"{pipeline_id}/{stage}/{CKPT_FILE}"
        self.uri = f"{self.prefix}/{self.key}"
        self._pushed: tuple | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def is_s3(self) -> bool:
        return storage.scheme(self.prefix) == "s3"

    def restore(self, local: Path) -> bool:
        """Fetch the mirrored checkpoint to `local` (whole or not at all: written under a
        temporary name, then renamed); False when there is none."""
        try:
            storage.download(self.uri, local)
        except storage.NotFound:
            return False
        except storage.StorageError as e:
            raise DataError(f"cannot read checkpoint {self.uri}: {e.reason} (check the cladapter-s3 "
                            "credentials)") from e
        self._pushed = self._stamp(local)
        return True

    @staticmethod
    def _stamp(path: Path):
        st = path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def push(self, local: Path) -> bool:
        """Copy `local` to the store if it changed since the last copy."""
        with self._lock:
            try:
                stamp = self._stamp(local)
            except FileNotFoundError:
                return False
            if stamp == self._pushed:
                return False
            try:  # one open handle, which survives the trainer's rename; on disk: renamed into place
                storage.upload(local, self.uri)
            except Exception as e:  # noqa: BLE001 - a failed copy must not stop training
                if not self._warned:
                    warnings.warn(f"checkpoint copy to {self.uri} failed ({type(e).__name__}: {e}); "
                                  "training goes on, a retried step may start over")
                    self._warned = True
                return False
            self._pushed = stamp
            return True

    def clear(self) -> None:
        """Remove the mirrored checkpoint (the stage is done)."""
        with contextlib.suppress(Exception):
            storage.remove(self.uri)
            if not storage.is_remote(self.uri):  # folders exist only on disk: drop the empty ones
                path = Path(storage.local_path(self.uri))
                for folder in (path.parent, path.parent.parent):  # <stage>/, <pipeline id>/
                    folder.rmdir()  # only when empty; stops at the first non-empty one

    @contextlib.contextmanager
    def watch(self, local: Path, interval: float | None = None):
        """Push `local` whenever it changes (polled), and once more on the way out."""
        interval = float(os.environ.get(SYNC_ENV, "15")) if interval is None else interval
        stop = threading.Event()

        def loop():
            while not stop.wait(interval):
                self.push(local)

        thread = threading.Thread(target=loop, name="checkpoint-sync", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.push(local)  # the checkpoint of an interrupted run (SIGTERM, error)


# -- training ------------------------------------------------------------------------------
TRAIN_SPLITS = ("train", "val")  # what training and tuning read; evaluation: its split and val
def _torchrun(params: dict, prepared: Path, out: Path, stage: int, init_from, nproc: int,
              run_id: str | None) -> dict:
    """Train with `nproc` processes of this node (DDP, one GPU each) through torchrun."""
    with tempfile.TemporaryDirectory(prefix="cladapter-ddp-") as tmp:
        params_file = Path(tmp) / "params.json"
        params_file.write_text(json.dumps(params))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "components.torchrun_train",
               "--params-json", str(params_file), "--prepared", str(prepared), "--out", str(out),
               "--stage", str(stage)]
        if init_from:
            cmd += ["--init-from", str(init_from)]
        if run_id:
            cmd += ["--run-id", run_id]
        env = dict(os.environ)
        from cladapter_core.tracking import tracking_uri
        env["MLFLOW_TRACKING_URI"] = tracking_uri()  # the ranks log to the same store
        proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise CLAdapterError(f"torchrun with {nproc} processes failed (exit code {proc.returncode}); "
                             "its output is above")
    summary = json.loads((out / "train_summary.json").read_text())
    return summary


def train_task(params: dict, dataset_dir, out_dir, stage: int, init_from=None,
               pipeline_id: str = "", checkpoint_prefix: str = "", num_gpus: int = 1,
               pipeline_name: str = "", data_hash: str = "") -> dict:
    """One training stage of a pipeline run; returns the trainer's summary.

    `num_gpus` > 1 runs DDP through torchrun (one process per GPU). With
    `checkpoint_prefix`, the checkpoint is mirrored there (see CheckpointStore).
    """
    from cladapter_core import tracking
    from cladapter_core.train import checkpoint_dir, train

    if stage not in (1, 2):
        raise ParamsError(f"stage must be 1 or 2, got {stage!r}")
    out = Path(out_dir)
    mode = params["train"]["mode"]
    root = checkpoint_root(checkpoint_prefix)
    store = CheckpointStore(root, pipeline_id, f"train_stage{stage}") if root else None
    local_ckpt = checkpoint_dir(out) / CKPT_FILE
    if store is not None and store.restore(local_ckpt):
        print(f"checkpoint restored from {store.uri}")
    watch = store.watch(local_ckpt) if store is not None else contextlib.nullcontext()
    with stage_tracking(params, f"train_stage{stage}", pipeline_id, data_hash,
                        pipeline_name, dataset_dir) as run, local_data(dataset_dir, TRAIN_SPLITS) as prepared:
        with watch:
            if num_gpus > 1:
                summary = _torchrun(params, prepared, out, stage, init_from, num_gpus,
                                    run.info.run_id if run is not None else None)
            else:
                callbacks = [tracking.EpochLogger()] if run is not None else []
                summary = train(params, prepared, out, stage=stage, mode=mode, init_from=init_from,
                                resume=True, callbacks=callbacks, progress=False)
        if run is not None:
            tracking.log_artifacts_dir(out, "model_dir")
    if store is not None:
        store.clear()
    return summary


def model_metadata(params: dict, summary: dict) -> dict:
    """What the KFP UI shows on a Model artifact."""
    m = params["model"]
    return {"backbone": m["backbone"], "K": m["num_centers"], "rank": m["rank"],
            "mode": summary["mode"], "stage": summary["stage"], "best_epoch": summary["best_epoch"],
            "select_metric": summary["select_metric"], "best_value": summary["best_value"],
            "framework": "pytorch", "format": "cladapter model directory (model.safetensors, config.json)"}


def summary_metrics(summary: dict) -> dict[str, float]:
    """The trainer's summary as KFP metrics (numbers only)."""
    out = {f"best_val_{summary['select_metric']}": summary["best_value"],
           "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
           "lr": summary["lr"], "seconds": summary["seconds"]}
    for k, v in (summary.get("param_report") or {}).items():
        out[f"params_{k}"] = v
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# -- tuning --------------------------------------------------------------------------------
def tune_plan_task(params: dict, n_trials: int, n_workers: int, pipeline_id: str = "") -> list[int]:
    """`tuning.tune_plan` in the pipeline run's MLflow context."""
    from components import tuning
    with pipeline_env(pipeline_id):
        return tuning.tune_plan(params, n_trials, n_workers, pipeline_id, tracking_on())


def tune_worker_task(params: dict, dataset_dir, worker_index: int, n_trials: int, n_workers: int,
                     pipeline_id: str = "", pipeline_name: str = "", data_hash: str = "") -> dict:
    """One tuning worker (`tuning.tune_worker`): its share of the trials."""
    import optuna

    from components import tuning
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tune prints one line per trial
    with pipeline_env(pipeline_id):
        if tracking_on():
            from cladapter_core import tracking
            tracking.check_tracking()
        with local_data(dataset_dir, TRAIN_SPLITS) as prepared:
            done = tuning.tune_worker(params, prepared, worker_index, n_trials,
                                      n_workers, pipeline_id, tracking_on())
    print(f"worker {worker_index}: trials {done['trials']} ({done['complete']} completed, "
          f"{done['pruned']} pruned, {done['failed']} failed)")
    return done


def tune_finish_task(params: dict, out_dir, pipeline_id: str = "", pipeline_name: str = "") -> tuple[dict, dict]:
    """The study's results (`tuning.tune_finish`); returns (tuned params, summary)."""
    from components import tuning
    with pipeline_env(pipeline_id):
        return tuning.tune_finish(params, out_dir, pipeline_id, tracking_on())


# -- evaluation, registry ------------------------------------------------------------------
def evaluate_task(params: dict, dataset_dir, model_dir, out_dir, pipeline_id: str = "",
                  pipeline_name: str = "", data_hash: str = "") -> dict:
    """Evaluate into `out_dir` (metrics.json, confusion_matrix.json, report.html, ...);
    logs the metrics (`<split>_<name>`) and the folder to the MLflow stage run."""
    from cladapter_core import tracking
    from cladapter_core.evaluate import evaluate
    from cladapter_core.evaluate import DECISION_SPLIT
    splits = sorted({params["evaluate"]["split"], DECISION_SPLIT})
    with stage_tracking(params, "evaluate", pipeline_id, data_hash,
                        pipeline_name, dataset_dir) as run, local_data(dataset_dir, splits) as prepared:
        metrics = evaluate(model_dir, prepared, out_dir, params)
        if run is not None:
            tracking.log_evaluation(out_dir, metrics, split=params["evaluate"]["split"],
                                    prepared=prepared, params=params)  # the data, as MLflow inputs
    return metrics


def gate_value(params: dict, eval_dir) -> float:
    """The value the pipeline's gate compares with `min_metric`: `register.metric` on the
    validation split (`decision_metrics.json`), the one promotion compares: the test split
    never decides what is registered or promoted."""
    from cladapter_core.registry import read_decision
    value = read_decision(eval_dir, params["register"]["metric"])["metrics"][params["register"]["metric"]]
    return value if math.isfinite(value) else -1e30  # NaN: the gate stays shut


def register_task(params: dict, model_dir, eval_dir, pipeline_id: str = "",
                  pipeline_name: str = "", data_hash: str = "") -> dict:
    """Register the model (`registry.register`); reads no data: `data_hash` is prepare's."""
    from cladapter_core import registry
    from components import lineage
    with stage_tracking(params, "register", pipeline_id, data_hash or None, pipeline_name) as run:
        if run is None:
            raise CLAdapterError("register needs MLflow: unset CLADAPTER_TRACKING=0")
        reg = registry.register(model_dir, eval_dir, params, data_hash=data_hash or None)
        tags = lineage.lineage_tags(pipeline_id, pipeline_name, data_hash)
        from cladapter_core import tracking
        with tracking.errors(f"tagging {reg['name']} version {reg['version']}"):
            lineage.tag_model_version(reg["name"], reg["version"], tags)
        return reg


def promote_task(params: dict, version: str, dataset_dir=None) -> dict:
    """Promote `version`; with the dataset, a champion measured on other data is
    re-evaluated on this run's validation split before the decision. Files are fetched
    only then: a champion measured on the same data needs none."""
    from cladapter_core import registry, tracking
    tracking.check_tracking()
    if not dataset_dir:
        return registry.promote(params, version=version)
    split = _reevaluation_split(params, version)
    if split is None:
        return registry.promote(params, version=version, prepared_dir=artifact_prepared(dataset_dir))
    with local_data(dataset_dir, [split]) as prepared:
        return registry.promote(params, version=version, prepared_dir=prepared)


def _reevaluation_split(params: dict, version: str) -> str | None:
    """The split promotion will re-evaluate the champion on, or None when the champion
    and `version` were measured on the same data and split (or there is no champion)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from cladapter_core import registry, tracking
    tracking.configure(params)
    client, name = MlflowClient(), params["register"]["model_name"]
    with tracking.errors(f"reading registered model {name!r}"):
        candidate = client.get_model_version(name, str(version))
        try:
            champion = client.get_model_version_by_alias(name, registry.CHAMPION)
        except MlflowException:
            return None
    if str(champion.version) == str(candidate.version) or registry.same_evaluation(candidate, champion):
        return None
    return candidate.tags.get("metric_split") or "val"

