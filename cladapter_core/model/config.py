"""The adapter's options, as one validated object: the adapter fields of params.yaml's
`model:` section (`param_models.Model`, where each is declared with its type, default,
bounds and help), taken from that declaration rather than written again."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, create_model

from ..errors import ModelError
from ..param_models import ADAPTER_FIELDS, FROZEN_MODES, INITS, MODES, Model, check

__all__ = ["AdapterConfig", "ADAPTER_FIELDS", "FROZEN_MODES", "INITS", "MODES"]


class _AdapterOptions(BaseModel):
    """Validated at construction, as params.yaml is; a bad value is a ModelError naming it."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **options):
        unknown = sorted(set(options) - set(ADAPTER_FIELDS))
        if unknown:
            raise ModelError(f"invalid adapter options: {', '.join(unknown)} (known: {', '.join(ADAPTER_FIELDS)})")
        problems = check({"model": options})[1]
        if problems:
            raise ModelError("invalid adapter options: " + "; ".join(problems))
        super().__init__(**options)


AdapterConfig = create_model(
    "AdapterConfig", __base__=_AdapterOptions, __module__=__name__,
    **{name: (Model.model_fields[name].annotation, Model.model_fields[name]) for name in ADAPTER_FIELDS})
AdapterConfig.__doc__ = ("The adapter's options (K, rank, depth, MLP ratio, temperature, init, "
                         "dropout): params.yaml's model fields, validated as there.")
