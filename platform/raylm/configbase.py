"""The base of every raylm config section: frozen, typed, and strict about unknown keys."""

from pydantic import BaseModel, ConfigDict


class ConfigSection(BaseModel):
    """A frozen, validated config section. Unknown keys are errors; change a copy with `model_copy(update=...)`."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
