"""The parameters, declared once: one pydantic model per section of params.yaml.

Each field states its type, default, bounds and help here and nowhere else:
`Params().model_dump()` is the embedded defaults, validation is pydantic's, and the
messages a user reads are made from the same declarations (`check`). Loading and
layering (defaults <- params.yaml <- best params <- flags) is `params.py`.

Types, as people write params.yaml and ``-S`` flags:

- `Int`: an integer; ``true`` or ``3.0`` is not one.
- `Number`: an int or a float kept as written (``15`` stays ``15``: the resolved dict
  is hashed into cache keys and checkpoint fingerprints); text that spells a number
  (``1e-4``, which YAML 1.1 reads as a string) becomes a float.
- `Flag`: ``true`` or ``false`` only (YAML already reads ``yes``/``no``; the text
  ``"yes"`` is not silently a bool).
"""
from __future__ import annotations

import re
import types
import typing
import warnings
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool,
                      StrictFloat, StrictInt, StrictStr, ValidationError, ValidationInfo,
                      field_validator, model_serializer, model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError


INITS = ("paper", "identity")
INTENSITY_MODES = ("auto", "percentiles", "type")  # data/intensity.py
# What a model trains: `cla` (the adapter), the baselines, and which of them keep the
# backbone frozen in their single stage (model.py documents each).
MODES = ("cla", "linear", "linear-mean", "full", "lp-ft")
FROZEN_MODES = ("linear", "linear-mean")
# The `model:` fields that configure the adapter itself (config.AdapterConfig is made of them).
ADAPTER_FIELDS = ("num_centers", "rank", "depth", "mlp_ratio", "temperature", "init", "dropout")
# macro_f1: the mean of per-class F1; f1_macro_pr: the paper's F1, 2PR/(P+R) of macro
# precision and macro recall (evaluation/metrics.py).
METRICS = ("accuracy", "macro_f1", "f1_macro_pr", "macro_precision", "macro_recall", "weighted_f1",
           "weighted_precision", "weighted_recall", "roc_auc", "neg_loss")
PRUNERS = ("median", "percentile", "hyperband", "none")
# Searching these would need another prepared dataset or would change the search itself.
NOT_SEARCHABLE = ("data.", "tune.", "evaluate.", "register.", "compare.")
_NUMBER_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _read_number(value):
    """'1e-4' -> 0.0001: YAML 1.1 reads a number without a dot before its exponent as text."""
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        return float(value)
    return value


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("blank")
    return text


Int = StrictInt
Number = Annotated[Union[StrictInt, StrictFloat], BeforeValidator(_read_number)]
Flag = StrictBool
Text = Annotated[StrictStr, Field(min_length=1)]
Name = Annotated[StrictStr, AfterValidator(_not_blank)]
Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr, None]
PositiveInt = Annotated[StrictInt, Field(gt=0)]


def problem(what: str) -> PydanticCustomError:
    """A validation error whose text is final: `check` prints 'dotted.name: <what>'
    (one line per line of `what`)."""
    return PydanticCustomError("cladapter", "{what}", {"what": what})


def _f(default, help: str, *, must: str | None = None, **bounds) -> Any:
    """A field: its default (a callable: a factory), help and bounds; `must` overrides the
    'must be ...' text that `check` otherwise derives from the type and bounds."""
    extra = {"must": must} if must else None
    if callable(default):
        return Field(default_factory=default, description=help, json_schema_extra=extra, **bounds)
    return Field(default, description=help, json_schema_extra=extra, **bounds)


class Section(BaseModel):
    """A section of params.yaml: unknown keys are refused by their dotted name."""
    model_config = ConfigDict(extra="forbid")
    UNKNOWN: ClassVar[str] = "unknown parameter"
    MUST: ClassVar[str] = "a mapping"


# -- data ------------------------------------------------------------------------------------
class Data(Section):
    """`data:` what `prepare` reads: the source and how it is split."""
    source: Text = _f("data/demo", "ImageFolder tree, CSV manifest, or folder of 3D .npy/.npz "
                      "(a path or URI)", must="a path")
    val_fraction: Number = _f(0.15, "share of the images for validation", ge=0, lt=1)
    test_fraction: Number = _f(0.15, "share of the images for the test split", ge=0, lt=1)
    shots_per_class: Optional[Int] = _f(None, "few-shot: keep at most this many training images "
                                        "per class (null: all)", ge=1)
    folds: Int = _f(0, ">1: k-fold on train+val, `fold` picks the validation fold", ge=0)
    fold: Int = _f(0, "the validation fold when folds > 1", ge=0)
    skip_invalid: Flag = _f(False, "true: leave unreadable files out and report them")
    allow_outside_root: Flag = _f(False, "true: accept CSV paths and symlinks that lead outside "
                                  "the data root (../, absolute paths); refused otherwise")
    resize: Optional[Int] = _f(None, "resize once at prepare time (small datasets), e.g. 64; "
                               "null: keep the size", ge=8)
    intensity: Literal[INTENSITY_MODES] = _f(
        "auto", "how pixel values reach [0, 1]: auto = integers by their real bit depth (12-bit "
        "data in 16-bit files / 4095), floats by the dataset's range; percentiles = the dataset's "
        "0.5th-99.5th; type = the file type's maximum (data/intensity.py)")

    @field_validator("test_fraction")
    @classmethod
    def _something_left_to_train_on(cls, value, info: ValidationInfo):
        val = info.data.get("val_fraction")
        if val is not None and val + value >= 1:
            raise problem(f"data.val_fraction + data.test_fraction = {val + value:g} leaves nothing "
                          "to train on (must be < 1)")
        return value

    @field_validator("fold")
    @classmethod
    def _fold_exists(cls, value, info: ValidationInfo):
        folds = info.data.get("folds")
        if folds is not None and folds > 1 and value >= folds:
            raise problem(f"must be < data.folds ({folds}), got {value!r}")
        return value


# -- model -----------------------------------------------------------------------------------
class Model(Section):
    """`model:` the backbone and the adapter (`params.model_kwargs` -> `build_model`)."""
    backbone: Text = _f("vit_base_patch16_clip_224.laion2b", "timm model name or torchvision video "
                        "model (r3d_18, ...); the paper's main backbone is CLIP ViT-B/16 (LAION-2B)",
                        must="a timm or torchvision video model name")
    backbone_kwargs: Optional[dict[Any, Any]] = _f(dict, "passed to timm.create_model as they are",
                                                   must="a mapping")
    input_size: Optional[Union[PositiveInt, Annotated[list[PositiveInt], Field(min_length=1)]]] = _f(
        None, "H, [H, W] or 3D [T, H, W]; null: the backbone's pretrained config",
        must="null, H, [H, W] or [T, H, W]")
    pretrained: Flag = _f(True, "true: timm/torchvision download the weights (needs internet; "
                          "given weights replace the download); false: random initialisation")
    weights: Optional[StrictStr] = _f(None, "local path, file:// or s3:// URI of backbone weights",
                                         must="a path or URI")
    num_centers: Int = _f(20, "K: the adapter's cluster centers", ge=1)
    rank: Int = _f(256, "r: size of the K transformation matrices (the reference code's 256)", ge=1)
    depth: Int = _f(1, "number of adapter blocks", ge=1)
    mlp_ratio: Number = _f(4.0, "hidden width of each block's MLP, as a multiple of D", gt=0)
    temperature: Number = _f(1.0, "tau in softmax(cos(q, c_k) / tau)", gt=0)
    init: Literal[INITS] = _f("paper", "paper: centers and transforms from N(0, 1); "
                              "identity: transforms start at I")
    dropout: Number = _f(0.0, "dropout inside the adapter's MLPs", ge=0, lt=1)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        from .backbone_names import check_backbone_name
        from .errors import ModelError
        try:
            check_backbone_name(name)
        except ModelError as e:
            raise problem(str(e)) from None
        return name


# -- train -----------------------------------------------------------------------------------
class Cache(Section):
    """`train.cache:` the stage-1 feature cache of the frozen backbone (cladapter_core/training/feature_cache.py)."""
    views: Optional[Int] = _f(None, "null = off (fresh augmentation every epoch, the default); 0 = "
                              "no augmentation; V = V augmented views (epoch e reads view e mod V: "
                              "V >= the stage's epochs sees the same images as no cache)", ge=0)
    dtype: Literal["float16", "float32"] = _f("float16", "storage precision of the features")
    storage: Literal["memory", "disk"] = _f("memory", "disk: memory-mapped under `dir`, reused "
                                            "across runs")
    dir: Text = _f(".cladapter_cache", "folder of the disk cache", must="a folder path")


class Augment(Section):
    """`train.augment:` training augmentations (cladapter_core/data/transforms.py), in the order
    and with the probabilities of the paper's code (albumentations): flips, brightness/contrast,
    then shift/scale/rotate with a black border."""
    hflip: Flag = _f(True, "horizontal flips, p 0.5 (false for images whose mirror is another "
                     "class, such as digits)")
    vflip: Flag = _f(True, "vertical flips, p 0.5")
    brightness: Number = _f(0.1, "brightness: + U(-b, b) (of the [0, 1] range)", ge=0, lt=1)
    contrast: Number = _f(0.1, "contrast: x U(1 - c, 1 + c)", ge=0, lt=1)
    color_p: Number = _f(0.5, "probability of the brightness/contrast change", ge=0, le=1)
    shift: Number = _f(0.05, "random shift, as a fraction of the size", ge=0, lt=1)
    scale: Number = _f(0.3, "random scale change: x U(1 - s, 1 + s)", ge=0, lt=1)
    rotate: Number = _f(180, "random rotation, in degrees: U(-r, r)", ge=0, le=180)
    affine_p: Number = _f(0.7, "probability of the shift/scale/rotation", ge=0, le=1)


class Train(Section):
    """`train:` the staged trainer (cladapter_core/training/)."""
    mode: Text = _f("cla", "cla | linear | linear-mean | full | lp-ft (param_models.MODES)",
                    must="a training mode")
    batch_size: Int = _f(8, "images per step", ge=1)
    num_workers: Union[Literal["auto"], Annotated[Int, Field(ge=0)]] = _f(
        "auto", "data loader processes; auto: from the cores and the device (data/workers.py)",
        must='"auto" or an integer >= 0')
    optimizer: Literal["adam", "adamw", "sgd"] = _f("adam", "the optimizer")
    lr: Number = _f(1e-4, "stage-1 learning rate", gt=0)
    weight_decay: Number = _f(0.001, "weight decay", ge=0)
    warmup_epochs: Int = _f(2, "linear warm-up epochs before the cosine decay", ge=0)
    warmup_max_fraction: Number = _f(0.25, "warm-up takes at most this share of a stage's steps "
                                     "(2 warm-up epochs must not fill a 2-epoch stage)", gt=0, le=1)
    grad_accum: Int = _f(1, "steps whose gradients are accumulated per update", ge=1)
    grad_clip: Number = _f(0.0, "max gradient norm, 0 = off (the paper's code does not clip)", ge=0)
    amp: Flag = _f(True, "mixed precision on GPUs (ignored on the CPU)")
    batchnorm: Literal["auto", "frozen", "train"] = _f(
        "auto", "the backbone's BatchNorm running statistics when it trains (stage 2, full, "
        "lp-ft): frozen = kept as pretrained (BatchNorm weight and bias still train); train = "
        "re-estimated from every batch; auto = frozen below batchnorm_min_batch images per device")
    batchnorm_min_batch: Int = _f(32, "auto: the per-device batch from which BatchNorm statistics "
                                  "are re-estimated", ge=2)
    select_metric: Literal[METRICS] = _f("macro_f1", "best epoch by this validation metric (the "
                                         "paper's code: accuracy)")
    select_ties: Literal["earlier", "later"] = _f("earlier", "which epoch a tie on the select metric "
                                                  "keeps (the paper's code: later)")
    early_stopping: Int = _f(0, "patience in epochs, 0 = off", ge=0)
    channels_last: Flag = _f(False, "CNNs: NHWC memory format (benchmarks/README.md)")
    compile: Flag = _f(False, "torch.compile the training forward (slow first steps)")
    cache: Cache = _f(Cache, Cache.__doc__)
    augment: Augment = _f(Augment, Augment.__doc__)

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        if mode not in MODES:
            raise problem(f"must be one of {', '.join(MODES)}, got {mode!r}")
        return mode


class Stage1(Section):
    """`stage1:` backbone frozen, adapter and head trained."""
    epochs: Int = _f(30, "epochs of stage 1", ge=0)


class Stage2(Section):
    """`stage2:` everything trained from the stage-1 weights."""
    epochs: Int = _f(10, "epochs of stage 2", ge=0)
    lr_factor: Number = _f(0.1, "stage-2 lr = train.lr * lr_factor", gt=0)


class Evaluate(Section):
    """`evaluate:` the split that is scored, and pictures."""
    split: Literal["train", "val", "test"] = _f("test", "the split evaluated")
    tsne: Flag = _f(False, "true: also draw a t-SNE of the features")


class Tracking(Section):
    """`tracking:` MLflow (the server from MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."""
    experiment: Optional[Name] = _f(None, "MLflow experiment; null: one per dataset, cladapter-<name of "
                                    "data.source's folder>", must="null or a non-empty name")


class Register(Section):
    """`register:` the MLflow registry and promotion."""
    model_name: Name = _f("cladapter-demo", "registered model name", must="a non-empty name")
    metric: Literal[METRICS] = _f("macro_f1", "promotion compares this metric, on the validation split "
                                  "(the test split never decides)")
    margin: Number = _f(0.0, "a candidate must beat the champion by more than this")
    confidence: Number = _f(0.95, "and be better by a paired test on the same images at this "
                            "confidence (register.test)", gt=0, lt=1)
    test: Literal["bootstrap", "mcnemar"] = _f(
        "bootstrap", "the paired test on both models' per-image predictions: bootstrap (register.metric "
        "over resampled images) or mcnemar (exact, on per-image correctness)")
    auto_promote: Flag = _f(False, "true: `register` (DVC, KFP) also promotes; false: promotion is "
                            "a separate, deliberate `cladapter promote`")


class Compare(Section):
    """`compare:` the learning rates of `cladapter compare`, per role (null: from train.lr)."""
    head_lr: Optional[Number] = _f(None, "frozen-backbone methods and every stage 1 (null: train.lr)", gt=0)
    backbone_lr: Optional[Number] = _f(None, "full fine-tuning and every stage 2 (null: train.lr * "
                                       "stage2.lr_factor)", gt=0)
    lr_grid: Int = _f(1, "learning rates each method tries per seed, the one best on validation "
                      "scored: its role's lr(s) times factors log-spaced over [1/lr_span, lr_span], the "
                      "same grid size for every method (1: the role's lr alone, no choice)", ge=1)
    lr_span: Number = _f(10, "how far the grid reaches either side of the role's lr (a factor)", gt=1)


# -- tune ------------------------------------------------------------------------------------
class SpaceEntry(Section):
    """One dimension of the search: ``{param, choices}`` or ``{param, low, high[, log, step]}``.
    Dumped as written (only the fields given)."""
    MUST: ClassVar[str] = ("a mapping such as {param: model.num_centers, choices: [5, 10, 20]} "
                           "or {param: train.lr, low: 1.0e-4, high: 1.0e-2, log: true}")
    # Unknown fields are reported by `_one_dimension`, together with the entry's other problems.
    model_config = ConfigDict(extra="allow")
    param: Text = _f(..., "the dotted name of a model, train, stage1 or stage2 parameter",
                     must="a parameter's dotted name (e.g. model.num_centers)")
    choices: Optional[Annotated[list[Scalar], Field(min_length=1)]] = _f(
        None, "the values to choose from", must="a non-empty list of numbers, strings, true/false or null")
    low: Optional[Number] = _f(None, "lower end of the range")
    high: Optional[Number] = _f(None, "upper end of the range")
    log: Flag = _f(False, "sample the range on a log scale")
    step: Optional[Number] = _f(None, "sample the range in steps of this size", gt=0)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices):
        if choices is not None and len(set(map(repr, choices))) != len(choices):
            raise problem(f"has duplicates: {choices!r}")
        return choices

    @model_validator(mode="after")
    def _one_dimension(self, info: ValidationInfo):
        lines = self._name_problems((info.context or {}).get("known"))
        if self.model_extra:
            lines.append(f"unknown field(s) {', '.join(sorted(self.model_extra))} "
                         f"(allowed: {', '.join(type(self).model_fields)})")
        if self.choices is not None:
            if {"low", "high", "log", "step"} & self.model_fields_set:
                lines.append("give either choices or low/high, not both")
        else:
            lines += self._range_problems()
        if lines:
            raise problem("\n".join(lines))
        return self

    def _name_problems(self, known) -> list[str]:
        name = self.param
        if name.startswith(NOT_SEARCHABLE) or name == "seed":
            return [f"{name} cannot be searched (only model, train, stage1 and stage2 values)"]
        if known is not None and name not in known:
            return [f"{name} is not a parameter"]
        return []

    def _range_problems(self) -> list[str]:
        low, high = self.low, self.high
        if low is None or high is None:
            return [f"needs choices: [...] or numbers low and high, got low={low!r} high={high!r}"]
        lines = [f"low ({low}) must be <= high ({high})"] if low > high else []
        if self.log and low <= 0:
            lines.append(f"a log scale needs low > 0, got {low}")
        if self.log and self.step is not None:
            lines.append("step and log cannot be combined")
        return lines

    @model_serializer(mode="wrap")
    def _as_written(self, handler):
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


def _default_space() -> list[SpaceEntry]:
    return [SpaceEntry(param="model.num_centers", choices=[5, 10, 20, 30, 50]),  # K, the paper's values
            SpaceEntry(param="stage1.epochs", low=10, high=50),   # around the default 30
            SpaceEntry(param="stage2.epochs", low=0, high=20),    # around the default 10
            SpaceEntry(param="train.lr", low=1.0e-5, high=1.0e-3, log=True),  # default lr / 10 .. x 10
            SpaceEntry(param="stage2.lr_factor", choices=[0.03, 0.1, 0.3])]


class Tune(Section):
    """`tune:` `cladapter tune`, the Optuna search (docs/tuning.md)."""
    study_name: Name = _f("cladapter", "the same name on the same storage resumes the study",
                          must="a non-empty name")
    storage: StrictStr = _f("sqlite:///outputs/tune/optuna.db", "Optuna storage: a SQLite file, or "
                            "postgresql://user@host:5432/db for workers on many machines",
                            must="a database URL such as sqlite:///outputs/tune/optuna.db or "
                                 "postgresql://user@host:5432/db", pattern="://")
    n_trials: Int = _f(20, "trials per `cladapter tune` call, split over the workers", ge=1)
    timeout: Optional[Number] = _f(None, "seconds per worker; null = no limit", gt=0,
                                   must="null or a number of seconds > 0")
    workers: Int = _f(1, "processes sharing the study", ge=1)
    seed: Optional[Int] = _f(None, "TPE sampler seed; null = the top-level seed (worker i adds i)",
                             ge=0, must="null (the top-level seed) or an integer >= 0")
    startup_trials: Int = _f(5, "random trials before TPE models the results", ge=0)
    pruner: Literal[PRUNERS] = _f("median", "how trials that cannot win are stopped")
    pruner_startup_trials: Int = _f(3, "median/percentile: completed trials before any pruning", ge=0)
    pruner_warmup_steps: Int = _f(2, "... and quarters of its stage-1 schedule a trial runs before "
                                  "it can be pruned (trials are compared at 1/4, 2/4, 3/4 and the "
                                  "end of stage 1, whatever its length)", ge=0)
    pruner_percentile: Number = _f(25.0, "percentile pruner: stop trials below this percentile",
                                   gt=0, lt=100)
    cache_views: Optional[Int] = _f(None, "null: trials train as the final run does (train.cache."
                                    "views); V: when train.cache.views is null, trials' stage 1 reads "
                                    "max(V, its epochs) cached augmented views (the same images as no "
                                    "cache, one backbone pass per view)", ge=1,
                                    must="null (as the final run) or an integer >= 1")
    rerun_top: Int = _f(3, "before best_params.yaml is written, the best this many trials train "
                        "again on tune.rerun_seeds seeds and the best mean wins (0: off)", ge=0)
    rerun_seeds: Int = _f(3, "seeds of each re-run: seed + 1, seed + 2, ... (not the search's own "
                          "seed, whose value the selection biased upward)", ge=1)
    space: list[SpaceEntry] = _f(_default_space, "what a trial varies (empty: training needs none; "
                                 "`cladapter tune` refuses it)",
                                 must="a list of entries such as "
                                      "{param: model.num_centers, choices: [5, 10, 20]}")
    best_params: Text = _f("outputs/tune/best_params.yaml", "written by `cladapter tune --out "
                           "outputs/tune`", must="a file path")
    use_best: Flag = _f(False, "true: every command applies best_params over params.yaml "
                        "(flags still win)")

    @field_validator("space")
    @classmethod
    def _each_once(cls, space: list[SpaceEntry]) -> list[SpaceEntry]:
        names = [e.param for e in space]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise problem("\n".join(f"{n} appears twice" for n in twice))
        return space


# -- all -------------------------------------------------------------------------------------
# `register` is also a method of the models' metaclass (ABCMeta.register); as a field name it
# only hides that method on Params, which nothing here calls.
warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows',
                        category=UserWarning)


class Params(Section):
    """params.yaml: every tunable number of the pipeline."""
    seed: Int = _f(0, "seed of the splits, initialisation, augmentation and sampling", ge=0)
    data: Data = _f(Data, Data.__doc__)
    model: Model = _f(Model, Model.__doc__)
    train: Train = _f(Train, Train.__doc__)
    stage1: Stage1 = _f(Stage1, Stage1.__doc__)
    stage2: Stage2 = _f(Stage2, Stage2.__doc__)
    evaluate: Evaluate = _f(Evaluate, Evaluate.__doc__)
    tracking: Tracking = _f(Tracking, Tracking.__doc__)
    register: Register = _f(Register, Register.__doc__)
    compare: Compare = _f(Compare, Compare.__doc__)
    tune: Tune = _f(Tune, Tune.__doc__)


# -- problems as lines ------------------------------------------------------------------------
def check(raw: dict, known: set[str] | None = None) -> tuple[Params | None, list[str]]:
    """(the validated Params, []) or (None, every problem as a 'dotted.name: what is
    wrong' line). `known`: the dotted names a tune.space entry may search."""
    try:
        return Params.model_validate(raw, context={"known": known}), []
    except ValidationError as e:
        return None, problem_lines(e, raw)


def problem_lines(exc: ValidationError, raw) -> list[str]:
    """One line per problem, named as params.yaml names it (``tune.space[1] (model.rank).choices``);
    a field that fails several ways (each member of a union) gives one line."""
    out: list[str] = []
    done: set[tuple] = set()
    for err in exc.errors(include_url=False):
        node, depth = _resolve(err["loc"])
        loc = err["loc"] if err["type"] == "extra_forbidden" else err["loc"][:depth]
        name, value = _name_and_value(raw, loc)
        if err["type"] == "cladapter":
            out += [f"{name}: {what}" for what in err["ctx"]["what"].splitlines()]
        elif err["type"] == "extra_forbidden":
            out.append(f"{name}: {node.UNKNOWN}")  # node: the section holding the key
        elif loc not in done:
            done.add(loc)
            out.append(f"{name}: must be {must_be(node)}, got {value!r}")
    return out


def _model_in(annotation, indexed: bool):
    """The Section class a field holds (directly or, `indexed`, as list items), else None."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return None if indexed else annotation
    if indexed and typing.get_origin(annotation) is list:
        return _model_in(typing.get_args(annotation)[0], False)
    return None


def _resolve(loc: tuple) -> tuple[Any, int]:
    """(the FieldInfo or Section class that `loc` reaches, how many parts of `loc` name it)."""
    node: Any = Params
    depth = 0
    for i, part in enumerate(loc):
        if isinstance(node, type) and isinstance(part, str) and part in node.model_fields:
            node = node.model_fields[part]
            node = _model_in(node.annotation, False) or node
        elif isinstance(node, FieldInfo) and isinstance(part, int) and _model_in(node.annotation, True):
            node = _model_in(node.annotation, True)
        else:
            break
        depth = i + 1
    return node, depth


def _name_and_value(raw, loc: tuple) -> tuple[str, Any]:
    name, value = "", raw
    for part in loc:
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        else:
            value = None
        if isinstance(part, int):
            param = value.get("param") if isinstance(value, dict) else None
            name += f"[{part}]" + (f" ({param})" if isinstance(param, str) and param else "")
        else:
            name += ("." if name else "") + str(part)
    return name, value


def must_be(node) -> str:
    """What a field (or section) must be, from its declaration: 'an integer >= 1',
    'null or a number > 0 and < 1', 'one of adam, adamw, sgd', ..."""
    if isinstance(node, type):
        return node.MUST
    extra = node.json_schema_extra if isinstance(node.json_schema_extra, dict) else {}
    if extra.get("must"):
        return extra["must"]
    leaves = _leaves(node.annotation)
    nullable = type(None) in leaves
    literal = [v for leaf in leaves if typing.get_origin(leaf) is Literal for v in typing.get_args(leaf)]
    if literal:
        what = "one of " + ", ".join(map(str, literal))
    elif bool in leaves:
        what = "true or false"
    else:
        what = "a number" if float in leaves else "an integer" if int in leaves else "a value"
        bounds = [f"{op} {getattr(m, attr)}" for m in node.metadata
                  for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                  if hasattr(m, attr)]
        what = " ".join([what, " and ".join(bounds)]).strip()
    return f"null or {what}" if nullable else what


def _leaves(annotation) -> list:
    """The plain types and Literals inside Optional/Union/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _leaves(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaves(arg)]
    return [annotation]
