"""The pipeline's parameters -> the resolved, validated params dict of a run."""
from __future__ import annotations

import json

from cladapter_core.errors import ParamsError


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
