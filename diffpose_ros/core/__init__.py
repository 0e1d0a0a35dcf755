"""The ROS-free core of diffpose_ros: pure PyTorch (with numba kernels), usable and testable alone.

Subpackages, each a concept: :mod:`.geometry` (intrinsics, se(3), frame conventions, error
measures), :mod:`.rendering` (CT volumes and the differentiable renderer), :mod:`.frames` (a
device frame made ready to register), :mod:`.registration` (costs, the Levenberg-Marquardt
solver, its levels, the registrar and the intraoperative pipeline), :mod:`.model` (the patient
model: CNN, view ranges and presets, view sampling, augmentation, training, the model file), :mod:`.simulation` (what a
detector and a clinical C-arm make of a DRR), :mod:`.io` (image, pose and DICOM files) and
:mod:`.navigation` (what a navigator reads: status, stamps, scene, overlay).

The names below are the public API that the command-line tools, the ROS 2 layer and the bag tools
use. They load on first use, so that a light consumer (the OpenIGTLink bridge) does not pay for the
renderer's compilation.
"""

from __future__ import annotations

import importlib

_API = {
    "geometry.camera": ("CONTRACT_PIXEL_MM", "CONTRACT_SDD_MM", "Intrinsics", "carm_parameters", "carm_pose"),
    "geometry.conventions": ("LPS_TO_RAS", "carm_to_ras", "fluoro_ijk_to_world", "ras_to_carm"),
    "rendering.volume": ("Volume", "default_ct_path", "default_labels_path", "hu_to_mu", "load_ct", "load_labels"),
    "rendering.renderer": ("BACKENDS", "Renderer"),
    "rendering.backends.numba_cpu": ("set_renderer_threads",),
    "frames.prepare": ("FRAME_KINDS", "Frame", "prepare_frame"),
    "frames.field": ("FieldSpec",),
    "registration.cost": ("COSTS",),
    "registration.intensity": ("POLARITIES",),
    "registration.levels": ("FINEST_WIDTHS", "Level", "pyramid"),
    "registration.registrar": ("RegistrationConfig", "RegistrationResult", "Registrar"),
    "registration.pipeline": ("Pipeline", "PipelineConfig", "set_torch_threads"),
    "registration.result": ("FrameResult", "Route", "covariance_in_parent"),
    "model.bundle": ("PatientModel", "PatientModelError", "load_patient_model", "save_patient_model"),
    "model.sampling": ("carm_sweep", "sample_views"),
    "model.views": ("CLINICAL_RANGE", "PRESETS", "Margin", "ViewRange", "ViewSet"),
    "model.train": ("TrainConfig", "Trainer"),
    "simulation.clinical": ("ClinicalFactors",),
    "simulation.detector": ("simulate_transmission",),
    "io.files": ("XrayImage", "load_pose", "load_poses", "read_xray", "save_json", "write_png", "write_picture"),
    "io.dicom": ("DicomXray", "read_dicom", "read_dicom_series"),
    "navigation.status": ("PoseStatus", "StaleTimer"),
    "navigation.stamps": ("parse_stamp", "split_stamp", "stamp_from_ns", "stamp_ns"),
    "navigation.overlay": ("render_overlay",),
}
_HOME = {name: module for module, names in _API.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
