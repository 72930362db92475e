"""The base for every component's config model.

Each component (``serve``, ``retrieval``, ``train``, ``loadtests``) defines its own pydantic
model on top of :class:`StrictModel`; ``cluster.config`` composes them into one YAML file.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """A config model that rejects unknown fields, so a typo is an error that names the field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
