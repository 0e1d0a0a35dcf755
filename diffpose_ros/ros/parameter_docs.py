"""The Markdown table of both nodes' parameters, written from their declarations into the docs.

``docs/node.md`` holds it between :data:`BEGIN` and :data:`END` (a test checks that it is current);
``python -m diffpose_ros.ros.parameter_docs docs/node.md`` rewrites it there.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .igtl.bridge import BRIDGE_PARAMETERS
from .parameters import Parameter
from .settings import PARAMETERS

__all__ = ["BEGIN", "END", "NODES", "markdown_table", "with_table"]

BEGIN = "<!-- parameters:begin -->"
END = "<!-- parameters:end -->"

NODES: dict[str, tuple[Parameter, ...]] = {"diffpose_node": PARAMETERS, "diffpose_igtl": BRIDGE_PARAMETERS}
"""Each node's parameters, by executable."""


def _default(p: Parameter) -> str:
    value = p.default
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, tuple):
        text = "[]"
    elif isinstance(value, str):
        text = value or '""'
    else:
        text = repr(value)
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """One Markdown table per node of :data:`NODES`, under a heading with its name: parameter, type,
    default, when it can be set (at start for read-only ones, else at runtime too), allowed values
    and description."""
    lines = []
    for node, table in NODES.items():
        lines += [f"#### `{node}`", "", "| Parameter | Type | Default | Set | Allowed | Description |"]
        lines.append("|---|---|---|---|---|---|")
        for p in table:
            when = "at start" if p.read_only else "at runtime"
            cells = (f"`{p.name}`", p.type_name, _default(p), when, p.constraints, p.description)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def with_table(text: str) -> str:
    """``text`` with :func:`markdown_table` between its :data:`BEGIN` and :data:`END` lines.
    ``ValueError`` when it does not have them, in that order."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return text[: start + len(BEGIN)] + "\n\n" + markdown_table() + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    """Rewrite the table in each Markdown file named on the command line."""
    for name in sys.argv[1:] if argv is None else argv:
        path = Path(name)
        path.write_text(with_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
