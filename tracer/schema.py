"""Building blocks shared by every part of the funnel spec (collectors and injectors define their own sections)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, SecretStr

from tracer.durations import parse_duration

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; YAML may say ``5s``, ``250ms``, ``5m`` or a plain number."""

Secret = SecretStr
"""Never printed: repr and str show ``**********``. Read with ``.get_secret_value()``."""


class Model(BaseModel):
    """Strict by default: a misspelt key is an error naming its YAML path, not a silent default."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, hide_input_in_errors=True)
