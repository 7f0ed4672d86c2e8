"""Parameters: embedded defaults <- params.yaml <- best params <- `-S section.key=value` flags.

Every parameter is declared once, in `param_models` (pydantic models, one per section:
type, default, bounds and help of each field). This module layers the sources and
validates the result: `load_params` reports every problem at once, each with the field's
dotted name and the file ("params.yaml: 3 problem(s): ..."), so a user fixes params.yaml
in one go. Unknown keys are refused with their dotted name.

Stages take the resolved params as a plain dict, not as the model: `load_params` returns
``Params.model_dump()``. That dict is hashed into checkpoint fingerprints and cache keys
(JSON with sorted keys), flattened into MLflow params, sent as JSON to KFP steps and
compared by tests; plain values keep all of those stable and need no pydantic on the
reading side. Numbers stay as written (``15`` is not turned into ``15.0``) for the same
reason.

Tuned values are a layer of loading: with ``tune.use_best`` true (or ``use_best=True``),
the best-params file that `cladapter tune` writes applies between params.yaml and the
flags. Reading it lives here; the tune package writes it and imports this module, never
the other way round.
"""
from __future__ import annotations

import logging
import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ParamsError
from .param_models import METRICS, Params, check  # noqa: F401  (METRICS: re-exported)

log = logging.getLogger(__name__)


def defaults() -> dict:
    """The embedded defaults: every parameter, as `load_params` returns them."""
    return Params().model_dump()


# -- dotted names ------------------------------------------------------------------------------
def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params and tables."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_dotted(params: dict, name: str, value) -> None:
    """params['a']['b'] = value for name 'a.b' (in place)."""
    node = params
    parts = name.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def get_dotted(params: dict, name: str, default=None):
    """params['a']['b'] for name 'a.b'; `default` when a part is missing."""
    node: Any = params
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def nest(values: dict) -> dict:
    """{'model.num_centers': 20} -> {'model': {'num_centers': 20}}."""
    out: dict = {}
    for k, v in values.items():
        set_dotted(out, k, v)
    return out


# -- layers -----------------------------------------------------------------------------------
def _merge(base: dict, new: dict, prefix: str, problems: list[str]) -> dict:
    """`new` set over `base`, section by section; a key `base` lacks is a problem, not set.
    ``model.backbone_kwargs`` is a free mapping: a layer replaces it whole."""
    out = copy.deepcopy(base)
    for key, value in (new or {}).items():
        name = f"{prefix}{key}"
        if key not in base:
            problems.append(f"{name}: unknown parameter")
        elif isinstance(base[key], dict) and key != "backbone_kwargs":
            if not isinstance(value, dict):
                problems.append(f"{name}: must be a mapping, got {value!r}")
                continue
            out[key] = _merge(base[key], value, name + ".", problems)
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
        set_dotted(nested, key, value)
    return nested


def _read_params_file(path) -> dict | None:
    """The mapping in the params file at `path`; None when the default params.yaml is absent."""
    if path is None:
        return None
    if not Path(path).is_file():
        if str(path) != "params.yaml":
            raise ParamsError(f"params file {path}: no such file")
        return None
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return data


PRESETS = ("paper",)


def preset_path(name: str) -> Path:
    """The YAML file of a shipped preset (cladapter_core/presets/<name>.yaml)."""
    from importlib import resources
    if name not in PRESETS:
        raise ParamsError(f"preset {name!r}: no such preset; choose from {', '.join(PRESETS)}")
    return Path(str(resources.files("cladapter_core").joinpath("presets", f"{name}.yaml")))


def load_params(path: str | Path | None = "params.yaml", overrides=None,
                validate: bool = True, use_best: bool | None = None, preset: str | None = None) -> dict:
    """Resolved params: defaults, then a shipped `preset` (e.g. "paper"), then the YAML file
    at `path` (if it exists), then the best-params file of `cladapter tune` when
    ``tune.use_best`` is true (`use_best`: True or False forces it on or off), then
    overrides. Validated (unless `validate` is False): the plain dict of
    `Params.model_dump()`; ParamsError listing every problem."""
    problems: list[str] = []
    params, source = defaults(), "defaults"
    if preset:
        params = _merge(params, _read_params_file(preset_path(preset)), f"preset {preset}: ", problems)
        source = f"preset {preset}"
    from_file = _read_params_file(path)
    if from_file is not None:
        source = str(path)
        params = _merge(params, from_file, "", problems)
    flags = parse_overrides(overrides)
    best, best_file = best_params_layer(params, flags, use_best)
    if best_file:  # tuned values: above the params file, below the flags
        params = _merge(params, best, f"{best_file}: ", problems)
    params = _merge(params, flags, "", problems)
    if validate:
        resolved, more = resolve(params)
        problems += more
        params = resolved if resolved is not None else params
    if problems:
        raise ParamsError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return params


# -- validation -------------------------------------------------------------------------------
def resolve(params: dict) -> tuple[dict | None, list[str]]:
    """(the validated params as a plain dict, []) or (None, every problem as a
    'dotted.name: what is wrong, got value' line)."""
    known = set(flatten({k: v for k, v in params.items() if k != "tune"})) \
        if isinstance(params, dict) else set()
    model, problems = check(params, known)
    return (model.model_dump() if model is not None else None), problems


def checked(params: dict, *sections: str) -> dict:
    """Whole params with the named `sections` of `params` (a params dict from code, which
    need not have gone through `load_params`) validated against their declarations and
    the rest at their defaults; ParamsError listing every problem at once."""
    given = {name: params[name] for name in sections if params.get(name) is not None}
    model, problems = check(given)
    if problems:
        raise ParamsError(f"bad {', '.join(sections)} parameters:\n  " + "\n  ".join(problems))
    return model.model_dump()


def validate_params(p: dict) -> list[str]:
    """Every problem in the params, as 'field: what is wrong' lines (empty: valid)."""
    return resolve(p)[1]


def model_kwargs(params: dict) -> dict:
    """build_model keyword arguments: every field of params['model'], and train.mode."""
    return {**params["model"], "mode": params["train"]["mode"]}


# -- tuned values -----------------------------------------------------------------------------
def read_best_params(path) -> dict:
    """The overrides in a best-params file (nested mapping); ParamsError when unreadable."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ParamsError(f"tune.best_params {path}: cannot read it ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"tune.best_params {path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ParamsError(f"tune.best_params {path}: expected a mapping of parameters, "
                          f"got {type(data).__name__}")
    return data


def best_params_layer(params_so_far: dict, flags: dict, use_best: bool | None) -> tuple[dict, str | None]:
    """(overrides, file) for `load_params`: the best-params file's contents when tuning
    results are to be used (`use_best` True, or None and ``tune.use_best`` true after the
    flags), else ({}, None). A missing file is a warning, not an error: `prepare` runs
    before the first search, and the values of params.yaml then stay."""
    if use_best is False:
        return {}, None
    tune = dict(params_so_far.get("tune") or {})
    flagged = (flags or {}).get("tune")
    if isinstance(flagged, dict):
        tune.update(flagged)
    if not (use_best or tune.get("use_best") is True):
        return {}, None
    path = Path(str(tune.get("best_params") or defaults()["tune"]["best_params"]))
    if not path.is_file():
        log.warning("tune.use_best is true but %s does not exist (run `cladapter tune`): "
                    "using the values of the params file", path)
        return {}, None
    best = read_best_params(path)
    shown = ", ".join(f"{k}={v}" for k, v in flatten(best).items())
    log.info("tuned parameters from %s: %s", path, shown or "none")
    return best, str(path)


def apply_best(params: dict, best) -> dict:
    """`params` with the values of a best-params file (path) or mapping set over it,
    validated (ParamsError naming the file's field)."""
    where = str(best) if not isinstance(best, dict) else "best params"
    values = flatten(best if isinstance(best, dict) else read_best_params(best))
    known = flatten(params)
    unknown = [k for k in values if k not in known and not k.startswith("model.backbone_kwargs.")]
    if unknown:
        raise ParamsError(f"{where}: unknown parameter(s) {', '.join(unknown)}")
    p = copy.deepcopy(params)
    for k, v in values.items():
        set_dotted(p, k, v)
    resolved, problems = resolve(p)
    if problems:
        raise ParamsError(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return resolved
