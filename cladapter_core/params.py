"""Parameters: embedded defaults <- params.yaml <- `-S section.key=value` flags.

`load_params` validates the result and reports every problem at once, each with the
field's dotted name, so a user fixes params.yaml in one go.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ParamsError

METRICS = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "weighted_f1",
           "weighted_precision", "weighted_recall", "roc_auc", "neg_loss")


def defaults() -> dict:
    text = resources.files("cladapter_core").joinpath("defaults.yaml").read_text()
    return yaml.safe_load(text)


def _merge(base: dict, new: dict, prefix: str, problems: list[str], strict: bool) -> dict:
    out = copy.deepcopy(base)
    for key, value in (new or {}).items():
        name = f"{prefix}{key}"
        if key not in base:
            if strict:
                problems.append(f"{name}: unknown parameter")
                continue
            out[key] = value
        elif isinstance(base[key], dict) and key != "backbone_kwargs":
            if not isinstance(value, dict):
                problems.append(f"{name}: must be a mapping, got {value!r}")
                continue
            out[key] = _merge(base[key], value, name + ".", problems, strict)
        else:
            out[key] = value
    return out


def parse_overrides(items: Iterable[str] | dict | None) -> dict:
    """`["model.num_centers=10", "stage1.epochs=3"]` -> nested dict (values read as YAML)."""
    if not items:
        return {}
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            if "=" not in item:
                raise ParamsError(f"override {item!r}: expected section.key=value")
            k, v = item.split("=", 1)
            pairs.append((k.strip(), yaml.safe_load(v) if v.strip() else None))
    nested: dict = {}
    for key, value in pairs:
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_params(path: str | Path | None = "params.yaml", overrides=None,
                validate: bool = True, use_best: bool | None = None) -> dict:
    """Resolved params: defaults, then the YAML file at `path` (if it exists), then the
    best-params file of `cladapter tune` when ``tune.use_best`` is true (`use_best`: True
    or False forces it on or off), then overrides."""
    problems: list[str] = []
    params = defaults()
    source = "defaults"
    if path is not None and Path(path).is_file():
        source = str(path)
        try:
            from_file = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ParamsError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(from_file, dict):
            raise ParamsError(f"{path}: expected a mapping at the top level")
        params = _merge(params, from_file, "", problems, strict=True)
    elif path is not None and str(path) != "params.yaml":
        raise ParamsError(f"params file {path}: no such file")
    flags = parse_overrides(overrides)
    from .tune import best_params_layer
    best, best_file = best_params_layer(params, flags, use_best)
    if best_file:  # tuned values: above the params file, below the flags
        params = _merge(params, best, f"{best_file}: ", problems, strict=True)
    params = _merge(params, flags, "", problems, strict=True)
    if validate:
        problems += validate_params(params)
    if problems:
        raise ParamsError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return params


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_params(p: dict) -> list[str]:
    """Every problem in the params, as 'field: what is wrong' lines."""
    from .config import INITS
    from .model import MODES
    out: list[str] = []

    def need(cond: bool, field: str, what: str, value: Any) -> None:
        if not cond:
            out.append(f"{field}: {what}, got {value!r}")

    def integer(field, value, low, allow_none=False):
        if value is None and allow_none:
            return
        need(_is_int(value) and value >= low, field, f"must be an integer >= {low}", value)

    def number(field, value, low=None, high=None, low_open=False):
        ok = _is_num(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high
        rng = f"{'>' if low_open else '>='} {low}" if low is not None else ""
        rng += f" and < {high}" if high is not None else ""
        need(ok, field, f"must be a number {rng}".rstrip(), value)

    integer("seed", p.get("seed"), 0)
    d = p["data"]
    need(isinstance(d["source"], str) and d["source"] != "", "data.source", "must be a path", d["source"])
    number("data.val_fraction", d["val_fraction"], 0, 1)
    number("data.test_fraction", d["test_fraction"], 0, 1)
    if _is_num(d["val_fraction"]) and _is_num(d["test_fraction"]):
        need(d["val_fraction"] + d["test_fraction"] < 1, "data.val_fraction + data.test_fraction",
             "must be < 1", d["val_fraction"] + d["test_fraction"])
    integer("data.shots_per_class", d["shots_per_class"], 1, allow_none=True)
    integer("data.folds", d["folds"], 0)
    integer("data.fold", d["fold"], 0)
    if _is_int(d["folds"]) and _is_int(d["fold"]) and d["folds"] > 1:
        need(d["fold"] < d["folds"], "data.fold", f"must be < data.folds ({d['folds']})", d["fold"])
    integer("data.resize", d["resize"], 8, allow_none=True)
    need(isinstance(d["skip_invalid"], bool), "data.skip_invalid", "must be true or false", d["skip_invalid"])

    m = p["model"]
    if not isinstance(m["backbone"], str) or not m["backbone"]:
        out.append(f"model.backbone: must be a timm or torchvision video model name, got {m['backbone']!r}")
    else:
        from .backbones import check_backbone_name
        from .errors import ModelError
        try:
            check_backbone_name(m["backbone"])
        except ModelError as e:
            out.append(f"model.backbone: {e}")
    need(isinstance(m["backbone_kwargs"] or {}, dict), "model.backbone_kwargs", "must be a mapping", m["backbone_kwargs"])
    size = m["input_size"]
    need(size is None or (_is_int(size) and size > 0) or (isinstance(size, list) and size and all(
        _is_int(v) and v > 0 for v in size)), "model.input_size", "must be null, H, [H, W] or [T, H, W]", size)
    need(isinstance(m["pretrained"], bool), "model.pretrained", "must be true or false", m["pretrained"])
    need(m["checkpoint"] is None or isinstance(m["checkpoint"], str), "model.checkpoint",
         "must be a path or URI", m["checkpoint"])
    integer("model.num_centers", m["num_centers"], 1)
    integer("model.rank", m["rank"], 1)
    integer("model.depth", m["depth"], 1)
    number("model.mlp_ratio", m["mlp_ratio"], 0, low_open=True)
    number("model.temperature", m["temperature"], 0, low_open=True)
    need(m["init"] in INITS, "model.init", f"must be one of {', '.join(INITS)}", m["init"])
    number("model.dropout", m["dropout"], 0, 1)

    t = p["train"]
    need(t["mode"] in MODES, "train.mode", f"must be one of {', '.join(MODES)}", t["mode"])
    integer("train.batch_size", t["batch_size"], 1)
    integer("train.num_workers", t["num_workers"], 0)
    need(t["optimizer"] in ("adam", "adamw", "sgd"), "train.optimizer", "must be adam, adamw or sgd", t["optimizer"])
    number("train.lr", t["lr"], 0, low_open=True)
    number("train.weight_decay", t["weight_decay"], 0)
    integer("train.warmup_epochs", t["warmup_epochs"], 0)
    integer("train.grad_accum", t["grad_accum"], 1)
    number("train.grad_clip", t["grad_clip"], 0)
    need(isinstance(t["amp"], bool), "train.amp", "must be true or false", t["amp"])
    need(t["select_metric"] in METRICS, "train.select_metric", f"must be one of {', '.join(METRICS)}", t["select_metric"])
    integer("train.early_stopping", t["early_stopping"], 0)
    need(isinstance(t["channels_last"], bool), "train.channels_last", "must be true or false", t["channels_last"])
    need(isinstance(t["compile"], bool), "train.compile", "must be true or false", t["compile"])
    c = t["cache"]
    integer("train.cache.views", c["views"], 0, allow_none=True)
    need(c["dtype"] in ("float16", "float32"), "train.cache.dtype", "must be float16 or float32", c["dtype"])
    need(c["storage"] in ("memory", "disk"), "train.cache.storage", "must be memory or disk", c["storage"])
    need(isinstance(c["dir"], str) and c["dir"] != "", "train.cache.dir", "must be a folder path", c["dir"])
    a = t["augment"]
    for k in ("hflip", "vflip"):
        need(isinstance(a[k], bool), f"train.augment.{k}", "must be true or false", a[k])
    for k in ("brightness", "contrast", "shift", "scale"):
        number(f"train.augment.{k}", a[k], 0, 1)
    number("train.augment.rotate", a["rotate"], 0, 180)

    integer("stage1.epochs", p["stage1"]["epochs"], 0)
    integer("stage2.epochs", p["stage2"]["epochs"], 0)
    number("stage2.lr_factor", p["stage2"]["lr_factor"], 0, low_open=True)
    need(p["evaluate"]["split"] in ("train", "val", "test"), "evaluate.split", "must be train, val or test", p["evaluate"]["split"])
    exp = p["tracking"]["experiment"]
    need(isinstance(exp, str) and exp.strip() != "", "tracking.experiment", "must be a non-empty name", exp)
    need(p["register"]["metric"] in METRICS, "register.metric", f"must be one of {', '.join(METRICS)}", p["register"]["metric"])
    number("register.margin", p["register"]["margin"])
    from .tune import validate_tune_params
    validate_tune_params(p, out)
    return out


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params and tables."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def model_kwargs(params: dict) -> dict:
    """build_model keyword arguments from params['model'] and train.mode."""
    m = params["model"]
    return dict(backbone=m["backbone"], mode=params["train"]["mode"],
                num_centers=m["num_centers"], rank=m["rank"], depth=m["depth"],
                pretrained=m["pretrained"], checkpoint=m["checkpoint"],
                mlp_ratio=m["mlp_ratio"], temperature=m["temperature"], init=m["init"],
                dropout=m["dropout"], backbone_kwargs=m["backbone_kwargs"] or {},
                input_size=m["input_size"])
