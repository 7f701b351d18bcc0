"""Which config keys a resumed run may not change: those whose value defines what a checkpoint's weights mean or their
shapes (the prediction kind, the process, the UNet, the text encoder...).

The keys are not listed here: a field made with ``ldm.config.schema.defining`` carries the mark, and a section's
unmarked fields take the section's (``model`` is marked whole, its ``gradient_checkpointing`` marked as an exception).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ldm.config.schema import MODEL_DEFINING, flatten, to_dict
from ldm.config.sections import LDMConfig


def _section_class(tp: Any) -> type | None:
    """The dataclass a field holds (also inside ``X | None``), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)


def defines_model(key: str, cls: type = LDMConfig) -> bool:
    """True when the dotted key (as ``flatten`` writes it) is model-defining: the mark of the innermost marked field
    on its path."""
    marked, section = False, cls
    for part in key.split("."):
        if section is None:
            break  # inside a value that is not a section (a list, a mapping): the enclosing mark holds
        field = {f.name: f for f in dataclasses.fields(section)}.get(part)
        if field is None:
            break
        marked = field.metadata.get(MODEL_DEFINING, marked)
        section = _section_class(typing.get_type_hints(section)[part])
    return marked


def resume_conflicts(saved: Any, current: Any) -> list[str]:
    """'key: checkpoint value -> this run's value' for every model-defining key that differs between two configs."""
    old, new = flatten(to_dict(saved)), flatten(to_dict(current))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if defines_model(k, type(current)) and old.get(k) != new.get(k)]
