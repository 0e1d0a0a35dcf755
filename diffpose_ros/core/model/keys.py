"""The one check of a configuration section read from YAML: its keys must name a dataclass's fields."""

from __future__ import annotations

from dataclasses import fields

__all__ = ["known_fields"]


def known_fields(cls: type, d: dict | None, section: str) -> dict:
    """A copy of ``d`` (None: empty); ``ValueError`` naming the ``section`` and the keys of ``d`` that
    are not fields of the dataclass ``cls``."""
    d = dict(d or {})
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {section} keys: {sorted(unknown)}")
    return d
