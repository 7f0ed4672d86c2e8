"""The search space (``tune.space``): checked before any trial runs, and the values each
trial gets.

The form of each entry (``{param, choices}`` or ``{param, low, high[, log, step]}``, a
searchable and existing parameter, each at most once) is checked with the rest of the
params, by `param_models.SpaceEntry`: training does not need a space, so an empty one is
valid there. `check_space` adds what only a search needs: a non-empty space whose every
choice and both ends of every range give valid params.
"""
from __future__ import annotations

import copy

from ..params import flatten, get_dotted, resolve, set_dotted
from ..errors import TuneError


def trial_params(params: dict, values: dict) -> dict:
    """The params of one trial: a copy of `params` with the dotted `values` set and, when
    ``tune.cache_views`` asks for it (and ``train.cache.views`` is null), the stage-1 feature
    cache on with at least one augmented view per epoch: the trial sees the images the final
    run sees, only cached."""
    p = copy.deepcopy(params)
    for k, v in values.items():
        set_dotted(p, k, v)
    views = (p.get("tune") or {}).get("cache_views")
    cache = p["train"].setdefault("cache", {})
    if views is not None and cache.get("views") is None:
        cache["views"] = max(views, p["stage1"]["epochs"])
    return p


def check_space(params: dict) -> list[dict]:
    """The search space, checked: every choice and both ends of every range must give
    valid params. Raises TuneError listing every problem. Choices come back as the
    params read them (the text ``1e-4`` for ``train.lr`` is the number 0.0001)."""
    space = params["tune"]["space"]
    if not space:
        raise TuneError("tune.space is empty: nothing to search. List at least one parameter, "
                        "e.g. `- {param: model.num_centers, choices: [5, 10, 20, 30, 50]}`")
    problems: list[str] = []
    checked = []
    for entry in space:
        name = entry["param"]
        values = entry["choices"] if "choices" in entry else [entry["low"], entry["high"]]
        read = [_checked_value(params, name, v, problems) for v in values]
        checked.append({**entry, "choices": read} if "choices" in entry else dict(entry))
    if problems:
        raise TuneError("the search space gives invalid params:\n  " + "\n  ".join(problems))
    return checked


def _checked_value(params: dict, name: str, value, problems: list[str]):
    """`value` as the params read it at `name`; its problems appended to `problems`."""
    resolved, lines = resolve(trial_params(params, {name: value}))
    for line in lines:
        if line.startswith(name + ":"):
            problems.append(f"tune.space ({name}): the value {value!r} is invalid: {line}")
    return value if resolved is None else get_dotted(resolved, name, value)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_int_dim(entry: dict, current) -> bool:
    """An integer range: integer ends and step, for a parameter that is not a float now."""
    ints = _is_int(entry["low"]) and _is_int(entry["high"]) and (
        entry.get("step") is None or _is_int(entry["step"]))
    return ints and not isinstance(current, float)


def suggest(trial, space: list[dict], params: dict) -> dict:
    """The trial's value for each entry of the space, by dotted name."""
    known = flatten(params)
    values = {}
    for e in space:
        name = e["param"]
        if "choices" in e:
            values[name] = trial.suggest_categorical(name, e["choices"])
        elif _is_int_dim(e, known.get(name)):
            values[name] = trial.suggest_int(name, e["low"], e["high"], step=e.get("step") or 1,
                                             log=bool(e.get("log")))
        else:
            values[name] = trial.suggest_float(name, float(e["low"]), float(e["high"]),
                                               step=e.get("step"), log=bool(e.get("log")))
    return values


def format_value(v) -> str:
    """A searched value as the trial lines print it (floats to 4 significant digits)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
