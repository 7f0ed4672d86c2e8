"""The pipeline's parameters, declared once, and -> the resolved, validated params dict of a run.

`PIPELINE_PARAMS` is the one list of what a user sets in the KFP UI: each entry names the
params field it sets (type, bounds and help come from that field's declaration in
cladapter_core/param_models.py; its default from the params file the pipeline is compiled
from) or, for the few parameters only the pipeline has (dataset_path, tune_trials,
train_nodes, ...), its own type, default and help. From it are built: the pipeline
function's signature and docstring (KFP reads each parameter's description from the
docstring's Args), the params step's inputs (`components/stages.py`, `params_step_inputs`)
and `PARAM_FIELDS`. Adding a parameter is adding an entry here.
"""
from __future__ import annotations

import inspect
import json
import typing
from dataclasses import dataclass
from typing import Any

from cladapter_core.errors import ParamsError

REQUIRED = inspect.Parameter.empty  # no default: the KFP UI asks for a value


@dataclass(frozen=True)
class UIParam:
    """One pipeline parameter. `field`: the dotted params field it sets (None: the pipeline's
    own); `note`: its unit and effect, after the field's help (the whole help without a
    field); `kind`/`default`: only without a field (a callable default gets the compiled
    params); `to_params`: an input of the params step."""
    name: str
    field: str | None
    note: str
    kind: type | None = None
    default: Any = None
    to_params: bool = True


PIPELINE_PARAMS: tuple[UIParam, ...] = (
    UIParam("dataset_uri", "data.source", "Required, no default: s3://bucket/prefix (every object "
            "under it), a DVC repository (git URL; set dataset_path) or `demo` (the bundled digits). "
            "A changed dataset is prepared again (its version is an input of the cached prepare step).",
            kind=str, default=REQUIRED),
    UIParam("dataset_path", None, "Path inside the S3 prefix (a sub-folder or a CSV manifest) or the "
            "DVC repository (DVC: required); empty: the whole prefix.", str, "", to_params=False),
    UIParam("dataset_rev", None, "DVC revision: branch, tag or commit; empty: the default branch. "
            "Pinned to its commit SHA when the run starts.", str, "", to_params=False),
    UIParam("backbone", "model.backbone", "The feature extractor both stages train on: a larger "
            "model needs more GPU memory and time."),
    UIParam("backbone_kwargs", "model.backbone_kwargs", "A mapping, e.g. {img_size: 224}; empty: the "
            "backbone's native input size."),
    UIParam("pretrained", "model.pretrained", "Effect: the backbone's starting weights, read from "
            "the install's weights mirror (CLADAPTER_WEIGHTS_MIRROR of the ConfigMap cladapter-pipeline; "
            "empty there: downloaded inside the pod)."),
    UIParam("weights_uri", "model.weights", "Empty: none (pretrained decides)."),
    UIParam("num_centers", "model.num_centers", "A count: more centers, finer clusters and more "
            "adapter parameters."),
    UIParam("stage1_epochs", "stage1.epochs", "Full passes over the training split with the "
            "backbone frozen; 0 skips stage 1."),
    UIParam("stage1_lr", "train.lr", "Per optimizer step, the peak after warm-up (cosine decay "
            "follows); stage2_lr is set apart."),
    UIParam("stage2_epochs", "stage2.epochs", "Full passes with every weight trained, from the "
            "stage-1 weights; 0 skips stage 2."),
    UIParam("stage2_lr", None, "Learning rate of stage 2 (everything trained), per optimizer step; "
            "kept as stage2.lr_factor = stage2_lr / stage1_lr (must be > 0).", float,
            lambda p: float(f"{p['train']['lr'] * p['stage2']['lr_factor']:.12g}")),
    UIParam("batch_size", "train.batch_size", "Larger: fewer steps per epoch, more GPU memory."),
    UIParam("seed", "seed", "An integer: the same seed and data give the same splits."),
    UIParam("model_name", "register.model_name", "The MLflow registered model the run adds a version to."),
    UIParam("promotion_margin", "register.margin", "In units of register.metric (0 to 1: 0.01 is one "
            "point of macro-F1); 0: any improvement promotes."),
    UIParam("auto_promote", "register.auto_promote", "Effect: false leaves the new version at "
            "alias challenger, the champion unchanged."),
    UIParam("min_metric", None, "Gate, in units of register.metric (0 to 1): register (and promote) "
            "only when the validation value of register.metric reaches it; 0: always.", float, 0.0,
            to_params=False),
    UIParam("tune_trials", None, "A count of Optuna trials (each a training run) before training; "
            "0: no search. More than 0 needs the Secret cladapter-tune (a PostgreSQL study storage).",
            int, 0, to_params=False),
    UIParam("tune_workers", None, "Parallel tuning workers (pods, one GPU each) sharing the study; "
            "the pipeline's ParallelFor runs a bounded number at once, the others wait.", int, 2,
            to_params=False),
    UIParam("checkpoint_prefix", None, "s3:// prefix for training checkpoints (run-scoped below it), "
            "so a retried step resumes; empty: the install's (ConfigMap cladapter-pipeline); none: a "
            "retry starts over.", str, "", to_params=False),
    UIParam("train_nodes", None, "A count of GPU nodes for stage 2: more than 1 runs it as a Kubeflow "
            "Trainer TrainJob (needs the Trainer, infra/k8s/training/, and an s3:// checkpoint_prefix "
            "the nodes share).", int, 1, to_params=False),
    UIParam("params_overrides", None, "Any other params field: `section.key=value` items separated "
            "by `;` or new lines; a field with its own parameter is refused here.", str, ""),
)


def _field(dotted: str):
    """The pydantic FieldInfo of a dotted params field (param_models)."""
    from cladapter_core.param_models import Params
    model, info = Params, None
    for part in dotted.split("."):
        info = model.model_fields[part]
        model = info.annotation
    return info


def _kfp_type(annotation) -> type:
    """A field's declared type as the KFP parameter type: str, int, float, bool or dict."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _kfp_type(args[0])
    if origin is typing.Union:
        kinds = {_kfp_type(a) for a in args if a is not type(None)}
        if kinds == {int, float}:
            return float
        if len(kinds) == 1:
            return kinds.pop()
    if origin is typing.Literal:
        return str
    if annotation in (str, int, float, bool) or origin is dict or annotation is dict:
        return dict if (origin is dict or annotation is dict) else annotation
    raise TypeError(f"no KFP parameter type for {annotation!r}: declare kind in PIPELINE_PARAMS")


def _optional(dotted: str) -> bool:
    return type(None) in typing.get_args(_field(dotted).annotation)


def _bounds(dotted: str) -> str:
    marks = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    found = [f"{sign} {getattr(m, key)}" for m in _field(dotted).metadata
             for key, sign in marks.items() if hasattr(m, key)]
    return f", {' and '.join(found)}" if found else ""


def kind_of(p: UIParam) -> type:
    return p.kind or _kfp_type(_field(p.field).annotation)


def default_of(p: UIParam, params: dict) -> Any:
    """The UI default: the compiled params' value of the field (None as "" or {})."""
    if p.default is REQUIRED:
        return REQUIRED
    if p.field is None:
        return p.default(params) if callable(p.default) else p.default
    node = params
    for part in p.field.split("."):
        node = node[part]
    if node is None:
        return {} if kind_of(p) is dict else ""
    return kind_of(p)(node) if kind_of(p) in (int, float, bool, str) else node


def help_of(p: UIParam) -> str:
    """The UI description: the field's help and bounds, then the unit and effect."""
    if p.field is None:
        return p.note
    text = _field(p.field).description.rstrip(".")
    return f"{text} (params field {p.field}{_bounds(p.field)}). {p.note}"


def signature(params: dict) -> inspect.Signature:
    """The pipeline function's signature (required parameters first, as Python wants)."""
    ordered = sorted(PIPELINE_PARAMS, key=lambda p: p.default is not REQUIRED)
    return inspect.Signature([inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                default=default_of(p, params), annotation=kind_of(p))
                              for p in ordered])


def docstring(summary: str) -> str:
    """`summary` and an Args section KFP reads the UI's descriptions from."""
    lines = [summary, "", "Args:"]
    lines += [f"    {p.name}: {' '.join(help_of(p).split())}" for p in PIPELINE_PARAMS]
    return "\n".join(lines) + "\n"


def params_step_inputs() -> list[tuple[str, type]]:
    """(name, type) of the params step's inputs besides base_params, in table order."""
    return [(p.name, kind_of(p)) for p in PIPELINE_PARAMS if p.to_params]


def param_fields() -> dict[str, str]:
    """Pipeline parameter -> the params field it sets (stage2_lr: DERIVED_FIELDS)."""
    return {p.name: p.field for p in PIPELINE_PARAMS if p.field}


PARAM_FIELDS = param_fields()
DERIVED_FIELDS = {"stage2.lr_factor": "stage2_lr"}
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
    known = param_fields()
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
            if value == "" and _optional(field):
                value = None  # the UI cannot send null: "" means none
            given[field] = value
    lr1, lr2 = values.get("stage1_lr"), values.get("stage2_lr")
    if lr2 is not None:
        if not isinstance(lr1, (int, float)) or not lr1 > 0 or not isinstance(lr2, (int, float)) or not lr2 > 0:
            raise ParamsError(f"stage1_lr and stage2_lr must be numbers > 0, got {lr1!r} and {lr2!r}")
        # stage-2 lr = train.lr * stage2.lr_factor; 12 digits keep 1e-4 / 1e-3 == 0.1 exactly
        given["stage2.lr_factor"] = float(f"{lr2 / lr1:.12g}")
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
