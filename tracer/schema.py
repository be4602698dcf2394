"""Building blocks shared by every part of the funnel spec (collectors and injectors define their own sections)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, SecretStr, WithJsonSchema

from tracer.durations import parse_duration

# In the JSON Schema (``funnel-tracer schema``) a duration is what YAML may say: a number of
# seconds or text such as 5s, 250ms, 1m30s.
_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?|(\d+(\.\d+)?(ms|s|m|h))+)\s*$"},
    ],
    "description": "a duration: seconds, or e.g. 5s, 250ms, 5m, 1h",
}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
"""Seconds; YAML may say ``5s``, ``250ms``, ``5m`` or a plain number."""

Secret = SecretStr
"""Never printed: repr and str show ``**********``. Read with ``.get_secret_value()``."""


class Model(BaseModel):
    """Strict by default: a misspelt key is an error naming its YAML path, not a silent default."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, hide_input_in_errors=True)
