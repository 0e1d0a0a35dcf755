"""Fixtures of the ROS 2 tests (helpers in ros_harness.py)."""

from __future__ import annotations

import pytest
from ros_harness import Scene, build_scene


@pytest.fixture(scope="session")
def scene(tmp_path_factory) -> Scene:
    """The patient model file and the rendered frames (see ros_harness)."""
    return build_scene(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def env_patch():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
