"""The layout a reader relies on: a ROS-free core with a pinned public API, no import cycles, small modules."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffpose_ros"
MAX_MODULE_LINES = 450
MAX_NODE_LINES = 400

PUBLIC_API = {
    "BACKENDS",
    "CLINICAL_RANGE",
    "CONTRACT_PIXEL_MM",
    "CONTRACT_SDD_MM",
    "COSTS",
    "ClinicalFactors",
    "DicomXray",
    "FINEST_WIDTHS",
    "FRAME_KINDS",
    "FieldSpec",
    "Frame",
    "FrameResult",
    "Intrinsics",
    "LPS_TO_RAS",
    "Level",
    "Margin",
    "POLARITIES",
    "PRESETS",
    "PatientModel",
    "PatientModelError",
    "Pipeline",
    "PipelineConfig",
    "PoseStatus",
    "RegistrationConfig",
    "RegistrationResult",
    "Registrar",
    "Renderer",
    "Route",
    "StaleTimer",
    "TrainConfig",
    "Trainer",
    "ViewRange",
    "ViewSet",
    "Volume",
    "XrayImage",
    "carm_parameters",
    "carm_pose",
    "carm_sweep",
    "carm_to_ras",
    "covariance_in_parent",
    "default_ct_path",
    "default_labels_path",
    "fluoro_ijk_to_world",
    "hu_to_mu",
    "load_ct",
    "load_labels",
    "load_patient_model",
    "load_pose",
    "load_poses",
    "parse_stamp",
    "prepare_frame",
    "pyramid",
    "ras_to_carm",
    "read_dicom",
    "read_dicom_series",
    "read_xray",
    "render_overlay",
    "sample_views",
    "save_json",
    "save_patient_model",
    "set_renderer_threads",
    "set_torch_threads",
    "simulate_transmission",
    "split_stamp",
    "stamp_from_ns",
    "stamp_ns",
    "write_picture",
    "write_png",
}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its body (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _imported_names(path: Path) -> set[str]:
    """Absolute names of what a module imports (relative imports left out: they stay in the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_the_core_is_ros_free():
    for name, path in _modules().items():
        if not name.startswith("diffpose_ros.core"):
            continue
        for imported in _imported_names(path):
            top = imported.split(".")[0]
            assert not (top.startswith("rclpy") or top.endswith("_msgs") or top in ("launch", "launch_ros")), (
                f"{name} imports {imported}: the core must not depend on ROS"
            )
            assert not imported.startswith(("diffpose_ros.ros", "diffpose_ros.bags", "diffpose_ros.cli")), (
                f"{name} imports {imported}: the core must not depend on the layers above it"
            )


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # a package's __init__ is imported on the way to each of its modules: an import of a module from its
    # own package's __init__ only is no cycle, so __init__ files count as leaves unless they import code
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_modules_are_small():
    for name, path in _modules().items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        limit = MAX_NODE_LINES if name == "diffpose_ros.ros.node" else MAX_MODULE_LINES
        assert lines <= limit, f"{name} has {lines} lines (at most {limit})"


def test_the_public_api_is_pinned_and_resolves():
    core = importlib.import_module("diffpose_ros.core")
    assert set(core.__all__) == PUBLIC_API
    for name in sorted(PUBLIC_API):
        value = getattr(core, name)
        assert value is not None
        if callable(value):
            assert (value.__doc__ or "").strip(), f"diffpose_ros.core.{name} has no docstring"
    with pytest.raises(AttributeError):
        core.not_a_name  # noqa: B018
