"""The base of the models' options schemas (a registry entry's ``options``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ModelOptions(BaseModel):
    """A model's options schema: suites are validated against it (strict types, unknown options
    rejected, values in range) before any model is built, as method knobs are by their ``Knob`` s."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Option -> its description (what `bench list models` shows)."""
        return {k: f.description or "" for k, f in cls.model_fields.items()}
