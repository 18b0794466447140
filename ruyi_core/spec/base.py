"""The base of every spec section: unknown fields and non-finite numbers are errors."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN learning rate is never what was meant
