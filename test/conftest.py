"""Fixtures and markers of the whole suite; helpers shared by test files live in ``test/support``.

The bundled CT is loaded once per session (it is the slow part); renderers and the registrar are
built on it once. Images are kept small (64^2 / 96^2 / 128^2) so the whole suite runs on 2 cores.
The ROS 2 tests share one patient model and its frames (:func:`scene`).

Markers: ``dds`` (the test starts ROS 2 participants: real DDS, other processes) and ``slow`` (the
test trains or registers many frames). ``pytest -m "not dds and not slow"`` is the quick loop.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from diffpose_ros.core.geometry import camera as geometry
from diffpose_ros.core.registration import registrar as register
from diffpose_ros.core.rendering import renderer as render
from diffpose_ros.core.rendering import volume

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from ros_harness import Scene, build_scene  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "dds: starts ROS 2 participants over real DDS (nodes, replays, launch)")
    config.addinivalue_line("markers", "slow: trains a model or registers many frames")


SDD = 1020.0


@pytest.fixture(scope="session")
def ct_path():
    return volume.default_ct_path()


@pytest.fixture(scope="session")
def hu(ct_path):
    return volume.load_ct(ct_path)


@pytest.fixture(scope="session")
def mu(hu):
    return volume.hu_to_mu(hu)


@pytest.fixture(scope="session")
def mu_coarse(mu):
    """The bundled CT at ~2 mm (171 x 171 x 133): cheap enough for the torch backend on CPU."""
    return mu.coarsened_to(2.0)


@pytest.fixture(scope="session")
def renderer(mu):
    return render.Renderer(mu, backend="numba")


@pytest.fixture(scope="session")
def registrar(mu):
    return register.Registrar(mu, backend="numba")


@pytest.fixture(scope="session")
def detector():
    """The contract's detector: 256^2 pixels of 1.2 mm at SDD 1020 mm (fx = fy = 850 px)."""
    return geometry.Intrinsics.from_detector(SDD, 256, 256, 1.2)


@pytest.fixture(scope="session")
def k64(detector):
    return detector.resized(64)


@pytest.fixture(scope="session")
def k128(detector):
    return detector.resized(128)


@pytest.fixture(scope="session")
def clinical_pose(hu):
    """A view inside the contract's clinical range (alpha 15, beta -10, gamma 5 deg, SOD 750 mm)."""
    iso = hu.center + torch.tensor([10.0, -5.0, 20.0], dtype=torch.float64)
    return geometry.carm_pose(math.radians(15), math.radians(-10), math.radians(5), 750.0, iso)


@pytest.fixture(scope="session")
def diffdrr_render(ct_path, mu):
    """``f(T_ct_source, K) -> (H, W)`` image from DiffDRR 0.6.1's Siddon renderer on OUR attenuation
    (the geometry contract's mapping, via ``DiffDRRReference``)."""
    pytest.importorskip("diffdrr")
    from diffpose_ros.core.rendering.diffdrr_reference import DiffDRRReference

    ref = DiffDRRReference(ct_path, mu=mu, sdd_mm=SDD)

    def render_ref(T: torch.Tensor, K: geometry.Intrinsics) -> torch.Tensor:
        with torch.no_grad():
            return ref.render(T.double(), K)

    return render_ref


@pytest.fixture(scope="module")
def pipeline(mu):
    """A pipeline whose CNN is untrained: it predicts its reference pose (for any frame and its
    negative alike), so frames near that pose are in the refinement's basin."""
    from diffpose_ros.core.model.bundle import PatientModel
    from diffpose_ros.core.model.regressor import PoseRegressor
    from diffpose_ros.core.registration.pipeline import Pipeline

    ref = geometry.carm_pose(0.0, 0.0, 0.0, 750.0, mu.center)
    camera = geometry.Intrinsics.from_detector(1020, 256, 256, 1.2).resized(64)
    return Pipeline(PatientModel(PoseRegressor(ref, mu.center, image_size=64), mu, camera))


@pytest.fixture(scope="session")
def scene(tmp_path_factory) -> Scene:
    """The patient model file and the rendered frames (see ros_harness)."""
    return build_scene(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def env_patch():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
