"""The tuning package's error for users."""
from __future__ import annotations

from ..errors import CLAdapterError


class TuneError(CLAdapterError):
    """The search cannot run as asked (empty space, bad storage, no completed trial)."""
