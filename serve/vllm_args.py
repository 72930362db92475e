"""vLLM engine arguments given as plain config values (YAML dicts) made into vLLM's own types."""

from __future__ import annotations

from typing import Any

__all__ = ["typed_sections"]


def typed_sections(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Dict values for vLLM's nested config dataclasses (``speculative_config``,
    ``structured_outputs_config`` …) validated into those dataclasses, as vLLM's CLI parser does."""
    import dataclasses
    import types
    import typing

    from pydantic import TypeAdapter, ValidationError
    from vllm.engine.arg_utils import AsyncEngineArgs

    def config_type(annotation):
        if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
            return annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
            return next(filter(None, map(config_type, typing.get_args(annotation))), None)
        return None

    fields = {f.name: f for f in dataclasses.fields(AsyncEngineArgs)}
    out = dict(kwargs)
    for name, value in kwargs.items():
        target = config_type(fields[name].type) if name in fields and isinstance(value, dict) else None
        if target is None:
            continue
        try:
            out[name] = TypeAdapter(target).validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"engine.extra_args.{name}: {exc}") from None
    return out
