"""Deployment settings: every environment variable the platform reads, declared once.

Parameters of an experiment live in params.yaml (`param_models`); how this machine, pod
or cluster runs it lives here: where MLflow is, which device, which image, the torchrun
rank. `settings()` reads the environment now (tests and spawned workers change it) and
validates it with pydantic-settings; an empty variable counts as unset, as Kubernetes
Secrets keep every key and leave the unused ones empty. What it validated is kept for the
same values of the variables (decoding asks for the pixel limit once per file).

No other module of the core reads `os.environ`; `export` is how the core hands a
setting on to the processes it starts (tuning workers, `mlflow models serve`).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_IMAGE = "ghcr.io/cladapter/cladapter:0.1.0"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Pillow's own default (PIL.Image.MAX_IMAGE_PIXELS): about a 9,459 x 9,459 image.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def _env(name: str, default, help: str, *also: str):
    return Field(default, validation_alias=AliasChoices(name, *also) if also else name, description=help)


class Settings(BaseSettings):
    """The environment, typed. Field names are ours; each alias is the variable's name."""
    model_config = SettingsConfigDict(extra="ignore", env_ignore_empty=True, populate_by_name=False,
                                      case_sensitive=True, frozen=True)

    # -- the platform's own ------------------------------------------------------------------
    image: str = _env("CLADAPTER_IMAGE", DEFAULT_IMAGE,
                      "the image the pipeline's training steps run (infra/docker/Dockerfile's build)")
    light_image_set: Optional[str] = _env("CLADAPTER_LIGHT_IMAGE", None,
                                          "the image of the steps that do not train (the Dockerfile's "
                                          "`light` target); default: the image's name + '-light', same tag")
    tracking: bool = _env("CLADAPTER_TRACKING", True, "0: no MLflow tracking (like --no-track)")
    device: Optional[str] = _env("CLADAPTER_DEVICE", None, "auto, cpu, cuda or cuda:N (--device)")
    gpu_decode: bool = _env("CLADAPTER_GPU_DECODE", False, "1: JPEGs decoded on the training GPU")
    model_cache: Optional[Path] = _env("CLADAPTER_MODEL_CACHE", None,
                                       "where models:/ URIs are downloaded (default: the user's cache)")
    git_commit: str = _env("CLADAPTER_GIT_COMMIT", "", "the commit the image was built from (no .git in it)")
    pipeline_id: str = _env("CLADAPTER_PIPELINE_ID", "", "the KFP run a step belongs to")
    scratch: Optional[Path] = _env("CLADAPTER_SCRATCH", None, "a step's ephemeral volume for temporary files")
    checkpoint_root: str = _env("CLADAPTER_CHECKPOINT_ROOT", "", "the install's checkpoint prefix (s3://)")
    checkpoint_sync_s: float = _env("CLADAPTER_CHECKPOINT_SYNC_S", 15.0,
                                    "seconds between mirrors of the trainer's checkpoint")
    tune_storage: str = _env("CLADAPTER_TUNE_STORAGE", "", "the Optuna storage URL of the tuning steps")
    weights_mirror: str = _env("CLADAPTER_WEIGHTS_MIRROR", "",
                               "s3:// prefix or folder of pretrained backbone weights (<name>.safetensors): "
                               "model.pretrained reads them there instead of downloading")
    # -- hostile input: what a file or a request may hold (docs/security.md) -----------------
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, gt=0, validation_alias="CLADAPTER_MAX_IMAGE_PIXELS",
                                  description="largest 2D image (width x height, read from its header "
                                              "before decoding) that prepare, predict and serving decode")
    max_volume_voxels: int = Field(4 * DEFAULT_MAX_IMAGE_PIXELS, gt=0,
                                   validation_alias="CLADAPTER_MAX_VOLUME_VOXELS",
                                   description="largest 3D item (frames x height x width of a .npy/.npz "
                                               "array or a frame folder, read before decoding)")
    serve_max_bytes: int = Field(32 * 2**20, gt=0, validation_alias="CLADAPTER_SERVE_MAX_BYTES",
                                 description="largest request body the scoring server reads (413 above)")
    serve_max_rows: int = Field(256, gt=0, validation_alias="CLADAPTER_SERVE_MAX_ROWS",
                                description="most images (rows) one request may hold (400 above)")
    serve_token: Optional[str] = _env("CLADAPTER_SERVE_TOKEN", None,
                                      "set: /invocations needs 'Authorization: Bearer <token>'")
    # -- MLflow ------------------------------------------------------------------------------
    mlflow_tracking_uri: Optional[str] = _env("MLFLOW_TRACKING_URI", None, "the MLflow server or store")
    mlflow_registry_uri: Optional[str] = _env("MLFLOW_REGISTRY_URI", None, "a separate model registry")
    mlflow_token: Optional[str] = _env("MLFLOW_TRACKING_TOKEN", None, "bearer token for the server")
    mlflow_username: Optional[str] = _env("MLFLOW_TRACKING_USERNAME", None, "basic-auth user")
    mlflow_password: str = _env("MLFLOW_TRACKING_PASSWORD", "", "basic-auth password")
    mlflow_insecure_tls: bool = _env("MLFLOW_TRACKING_INSECURE_TLS", False, "true: skip TLS verification")
    mlflow_run_id: Optional[str] = _env("MLFLOW_RUN_ID", None,
                                        "a run its launcher opened for this process (KFP 2.17's MLflow "
                                        "integration, `mlflow run`)")
    outer_run: Literal["auto", "own"] = _env("CLADAPTER_OUTER_RUN", "auto",
                                             "auto: with $MLFLOW_RUN_ID set, runs nest under that run, in its "
                                             "experiment; own: the platform's own parent run, that run untouched")
    # -- S3 ----------------------------------------------------------------------------------
    s3_endpoint: Optional[str] = _env("AWS_ENDPOINT_URL", None, "an S3-compatible endpoint (MinIO)",
                                      "MLFLOW_S3_ENDPOINT_URL")
    # -- the process's surroundings (torchrun, CUDA, the user's folders) --------------------
    rank: int = _env("RANK", 0, "torchrun: this process's global rank")
    world_size: int = _env("WORLD_SIZE", 1, "torchrun: processes in the job")
    local_rank: int = _env("LOCAL_RANK", 0, "torchrun: rank on this node")
    local_world_size: int = _env("LOCAL_WORLD_SIZE", 1, "torchrun: processes on this node")
    cuda_visible_devices: Optional[str] = Field(None, validation_alias="CUDA_VISIBLE_DEVICES",
                                                description="GPUs visible to torch ('' or -1: none)")
    path: str = _env("PATH", "", "where executables are found")
    xdg_cache_home: Optional[Path] = _env("XDG_CACHE_HOME", None, "the user's cache folder")

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or DEFAULT_TRACKING_URI

    @property
    def light_image(self) -> str:
        """CLADAPTER_LIGHT_IMAGE, else the image's repository + '-light' with its tag
        (registry/team/cladapter:7 -> registry/team/cladapter-light:7); an image pinned by
        digest names no light variant: the full image then."""
        if self.light_image_set:
            return self.light_image_set
        if "@" in self.image:
            return self.image
        repo, slash, name = self.image.rpartition("/")
        name, colon, tag = name.partition(":")
        return f"{repo}{slash}{name}-light{colon}{tag}"


def _variables() -> tuple[str, ...]:
    names = []
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        names += alias.choices if isinstance(alias, AliasChoices) else [alias]
    return tuple(names)


_VARIABLES = _variables()
_SEEN: dict[tuple, Settings] = {}  # the values of _VARIABLES -> what they validated to


def settings() -> Settings:
    """The settings as the environment holds them now (validated once per set of values:
    about a millisecond, which prepare would otherwise spend on every file)."""
    key = tuple(map(os.environ.get, _VARIABLES))
    found = _SEEN.get(key)
    if found is None:
        cuda = os.environ.get("CUDA_VISIBLE_DEVICES")  # "" means no GPU: not "unset"
        found = Settings(**({"CUDA_VISIBLE_DEVICES": cuda} if cuda == "" else {}))
        if len(_SEEN) > 64:  # tests and workers change the environment: keep a few
            _SEEN.clear()
        _SEEN[key] = found
    return found


def var(name: str) -> str:
    """The environment variable of a setting: var("device") -> "CLADAPTER_DEVICE"."""
    alias = Settings.model_fields[name].validation_alias
    return alias.choices[0] if isinstance(alias, AliasChoices) else alias


def tracking_on(asked: bool = True) -> bool:
    """Log to MLflow: asked for (no --no-track), not switched off by CLADAPTER_TRACKING=0,
    and this process is torchrun's rank 0 (one MLflow run per stage, not one per process)."""
    s = settings()
    return bool(asked) and s.tracking and s.rank == 0


def export(**values: str | None) -> None:
    """Set settings (by field name) for this process and those it starts; None unsets."""
    for name, value in values.items():
        var_name = var(name)
        if value is None:
            os.environ.pop(var_name, None)
        else:
            os.environ[var_name] = str(value)


@contextlib.contextmanager
def exported(**values: str | None):
    """`export(**values)` for the duration of a block, then the values of before."""
    before = {name: os.environ.get(var(name)) for name in values}
    export(**values)
    try:
        yield
    finally:
        export(**before)
