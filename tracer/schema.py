"""Building blocks shared by every part of the funnel spec (collectors and injectors define their own sections)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, WithJsonSchema

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


def _parses(url: str) -> str:
    """The URL must split into parts (``http://[::1`` or ``:99999`` does not): else every probe
    would fail in the HTTP client at run time instead of ``validate`` naming the YAML path."""
    try:
        urlsplit(url).port  # noqa: B018 - the property raises on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    return url


HttpUrl = Annotated[str, Field(pattern=r"^https?://"), AfterValidator(_parses)]
"""An http(s) URL that parses (templates such as ``{capture.id}`` in it are fine)."""

Secret = SecretStr
"""Never printed: repr and str show ``**********``. Read with ``.get_secret_value()``."""


class Model(BaseModel):
    """Strict by default: a misspelt key is an error naming its YAML path, not a silent default."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, hide_input_in_errors=True)
