"""Our renderer against DiffDRR 0.6.1's Siddon on the same attenuation: the proof of the geometry conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose

SDD = 1020.0


def pearson(a, b) -> float:
    """Plain float64 Pearson correlation (independent of the project's similarity module)."""
    a = a.detach().double().flatten().numpy()
    b = b.detach().double().flatten().numpy()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


pytest.importorskip("diffdrr")

# (alpha, beta, gamma deg, SOD mm, isocentre offset from the volume centre mm, principal-point offset px)
VIEWS = [
    (0.0, 0.0, 0.0, 750.0, (0.0, 0.0, 0.0), (0.0, 0.0)),
    (25.0, -15.0, 8.0, 680.0, (30.0, -20.0, 35.0), (3.5, -3.0)),
    (-28.0, 18.0, -9.0, 820.0, (-35.0, 25.0, -30.0), (0.0, 0.0)),
    (12.0, 9.0, 4.0, 700.0, (15.0, 38.0, -10.0), (-2.75, 3.25)),
]
N = 96


@pytest.mark.parametrize("view", VIEWS, ids=["AP", "oblique-offcentre-pp", "oblique-2", "oblique-offcentre-pp-2"])
def test_matches_diffdrr_siddon(view, hu, renderer, diffdrr_render):
    a, b, g, sod, off, pp = view
    K = Intrinsics.from_detector(SDD, N, N, 1.2 * 256 / N, principal_point=((N - 1) / 2 + pp[0], (N - 1) / 2 + pp[1]))
    T = carm_pose(
        math.radians(a), math.radians(b), math.radians(g), sod, hu.center + torch.tensor(off, dtype=torch.float64)
    )
    ref = diffdrr_render(T, K)
    ours = renderer.render(T, K)
    assert ours.shape == ref.shape == (N, N)
    assert float(ref.max()) > 1.0  # the view sees the patient
    assert pearson(ours, ref) >= 0.999
    assert float(ours.mean() / ref.mean()) == pytest.approx(1.0, abs=0.01)
    # A left-right mirror of our image must not pass for DiffDRR's: the convention is tested, not just the content.
    assert pearson(ours.flip(-1), ref) < 0.95
    # And neither must an up-down flip.
    assert pearson(ours.flip(-2), ref) < 0.95
