"""ROS stamps as integer nanoseconds and as the ``sec.nanosec`` text that statuses and reports carry."""

from __future__ import annotations

__all__ = ["parse_stamp", "split_stamp", "stamp_from_ns", "stamp_ns"]

NS_PER_S = 1_000_000_000


def stamp_ns(stamp) -> int:
    """Integer nanoseconds of a stamp with ``sec`` and ``nanosec`` (``builtin_interfaces/Time``)."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def split_stamp(ns: int) -> tuple[int, int]:
    """``(sec, nanosec)`` of a stamp in nanoseconds, the fields of ``builtin_interfaces/Time``."""
    return ns // NS_PER_S, ns % NS_PER_S


def stamp_from_ns(ns: int) -> str:
    """``sec.nanosec`` (9 digits, exact) of a stamp in nanoseconds."""
    return f"{ns // NS_PER_S}.{ns % NS_PER_S:09d}"


def parse_stamp(text: str, strict: bool = True) -> int:
    """Nanoseconds of a ``sec.nanosec`` stamp, the inverse of :func:`stamp_from_ns`.

    ``strict``: exactly 9 fraction digits (``ValueError`` otherwise); else any digits, a missing
    fraction counting as 0 (the diagnostics' spelling).
    """
    sec, _, nanosec = text.partition(".")
    if strict and not (sec.isdigit() and nanosec.isdigit() and len(nanosec) == 9):
        raise ValueError(f"stamp must be sec.nanosec with 9 digits, got {text!r}")
    return int(sec) * NS_PER_S + int(nanosec or 0)
