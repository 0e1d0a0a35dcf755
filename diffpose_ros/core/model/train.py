"""Preoperative, self-supervised training of the pose CNN on one patient's CT.

Each step draws views over the model's views (a procedure preset of :mod:`.views` widened by a
margin; :mod:`.sampling`), renders their DRRs with our renderer on a coarsened attenuation volume,
applies device-like augmentations (:mod:`.augment`), and regresses the pose (:mod:`.regressor`).
The loss is the 3D mean target registration error (mm, over the target points) plus a small
rotation term (degrees): the metric we report, directly.

On a CPU rendering is the costly half, so renders are pooled and reused with an exact augmentation:
a camera turned about its focal spot sees the same rays, so its image is an exact homography of the
unturned one (:meth:`~diffpose_ros.core.geometry.camera.Intrinsics.sampling_grid`). The pool holds renders at roll
``gamma = 0`` on a larger detector; each use turns the camera by a fresh roll about the principal
ray (a view with roll ``gamma`` is ``T(gamma = 0) Rz(gamma)``) and, with ``aim_deg``, tilts the
principal ray by up to that angle in a random direction, then resamples the image and adds fresh
noise. On a GPU (:data:`GPU_PROFILE`) each step renders as many new views as it uses. The pool, the
augmentations and the network live on the training device; poses and the sampler stay on the CPU.

The schedule is set by wall-clock time (the user's budget): cosine decay of the learning rate over
the budget after a short warm-up. Checkpoints are safetensors (weights and optimiser state) plus a
JSON state; a run resumes from them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import roma
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffpose_ros.core.geometry import metrics, se3
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose
from diffpose_ros.core.rendering.renderer import Renderer
from diffpose_ros.core.rendering.volume import Volume, hu_to_mu

from .augment import AugmentConfig, augment
from .keys import known_fields
from .regressor import STEMS, PoseRegressor, bfloat16_is_fast
from .sampling import sample_views
from .views import Margin, ViewSet

__all__ = ["GPU_PROFILE", "TrainConfig", "Trainer", "validation_errors"]

#: Defaults that differ on a CUDA device: rendering costs little there, so each step renders its
#: whole batch fresh and batches are larger; validation and checkpoints come more often in a run of
#: minutes; the backbone keeps timm's stage widths and stem and the range of views its wider margin
#: (the narrower ones spend a CPU's fewer steps better). What it reaches: ``docs/performance.md``.
GPU_PROFILE = {
    "backbone_channels": None,
    "backbone_stem": None,
    "view_margin": {"angle_deg": 5.0, "roll_deg": 2.0, "sod_mm": 20.0, "isocenter_mm": 5.0},
    "batch_size": 128,
    "learning_rate": 3e-3,
    "warmup_steps": 300,
    "pool_size": 16384,
    "pool_refresh": 128,
    "validation_every_s": 10.0,
    "checkpoint_every_s": 60.0,
}


@dataclass
class TrainConfig:
    """Training settings (``config/training.yaml`` holds the CPU defaults in readable form;
    :meth:`for_device` gives a CUDA device's).

    Detector: ``sdd_mm``, ``detector_pixels``, ``pixel_mm`` define the device-independent working
    camera; the CNN sees it resampled to ``image_size`` pixels. ``voxel_mm``: training volume voxel
    size; ``bone_scales``: bone attenuation multipliers (one volume each, drawn per batch);
    ``mixed_precision``: bfloat16 backbone, ``"auto"`` = where it is fast (:func:`.regressor.bfloat16_is_fast`).
    ``backbone``: a timm model name; ``backbone_channels``: its four stage widths (timm ResNets),
    ``None`` for the model's own (what a ``backbone`` named without widths gets); ``backbone_stem``:
    ``"patch"`` or ``None`` (:data:`.regressor.STEMS`; likewise). ``aim_deg``: largest
    tilt (degrees) of the principal ray about the focal spot applied to pool renders on reuse.
    ``view_range``: the views to train for, :meth:`.views.ViewSet.from_spec` of the configured
    value (a preset, or boxes of one's own); :attr:`trained_views`: what training draws. Pool renders
    are turned by a roll drawn over every mode's roll range (the presets share one).
    """

    image_size: int = 64
    sdd_mm: float = 1020.0
    detector_pixels: int = 256
    pixel_mm: float = 1.2
    voxel_mm: float = 2.8
    bone_scales: tuple[float, ...] = (1.0, 1.6, 2.4)
    batch_size: int = 48
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    backbone: str = "resnet10t"
    backbone_channels: tuple[int, ...] | None = (64, 128, 192, 256)
    backbone_stem: str | None = "patch"
    pool_size: int = 2048
    pool_refresh: int = 8
    aim_deg: float = 0.0
    validation_views: int = 256
    validation_every_s: float = 60.0
    checkpoint_every_s: float = 120.0
    rotation_weight: float = 1.0
    mixed_precision: bool | str = "auto"
    seed: int = 0
    view_range: ViewSet = field(default_factory=lambda: ViewSet.from_spec("ap"))
    view_margin: Margin = field(default_factory=Margin)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @classmethod
    def for_device(cls, device: str | torch.device, d: dict | None = None) -> TrainConfig:
        """The defaults for ``device`` (a CUDA device starts from :data:`GPU_PROFILE`), overridden by ``d``."""
        merged = dict(GPU_PROFILE) if torch.device(device).type == "cuda" else {}
        for key, value in (d or {}).items():  # nested sections (view_margin, augment) merge key by key
            both = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = {**merged[key], **value} if both else value
        return cls.from_dict(merged)

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainConfig:
        d = dict(d or {})
        margin = Margin.from_dict(d.pop("view_margin", None))
        view = ViewSet.from_spec(d.pop("view_range", "ap"), margin)
        aug = AugmentConfig.from_dict(d.pop("augment", None))
        d = known_fields(cls, d, "training")  # the sections taken above are gone from d
        if d.get("mixed_precision", "auto") not in (True, False, "auto"):
            raise ValueError(f"mixed_precision must be true, false or auto, got {d['mixed_precision']!r}")
        if "backbone" in d:  # a backbone named without widths or stem keeps its own
            d.setdefault("backbone_channels", None)
            d.setdefault("backbone_stem", None)
        if not 0 <= float(d.get("aim_deg", 0.0)) <= 10:
            raise ValueError(f"aim_deg must be between 0 and 10 degrees, got {d['aim_deg']}")
        if d.get("backbone_stem") not in STEMS:
            raise ValueError(
                f"backbone_stem must be one of {list(STEMS)} (null = the model's own), got {d['backbone_stem']!r}"
            )
        for key in ("bone_scales", "backbone_channels"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        widths = d.get("backbone_channels")
        if widths is not None and (len(widths) != 4 or not all(isinstance(w, int) and w > 0 for w in widths)):
            raise ValueError(f"backbone_channels must be four positive integers (one per stage), got {list(widths)}")
        return cls(view_range=view, view_margin=margin, augment=aug, **d)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["view_range"] = self.view_range.as_spec()
        d["view_margin"] = self.view_margin.as_dict()
        d["augment"] = self.augment.as_dict()
        d["bone_scales"] = list(self.bone_scales)
        d["backbone_channels"] = list(self.backbone_channels) if self.backbone_channels else None
        return d

    @property
    def intrinsics(self) -> Intrinsics:
        """The CNN's working camera: the configured detector resampled to ``image_size``."""
        full = Intrinsics.from_detector(self.sdd_mm, self.detector_pixels, self.detector_pixels, self.pixel_mm)
        return full.resized(self.image_size)

    @property
    def trained_views(self) -> ViewSet:
        """The views training draws: a preset widened by ``view_margin``, boxes of one's own as they are."""
        return self.view_range.trained(self.view_margin)


def _turn(tilt: torch.Tensor, direction: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Source-frame rotations ``(..., 3, 3)``: a roll (rad) about the principal ray, then a tilt (rad)
    of the principal ray toward ``direction`` (rad, from the source's +x axis toward +y)."""
    zero = torch.zeros_like(roll)
    aim = torch.stack([tilt * torch.cos(direction), tilt * torch.sin(direction), zero], -1)
    return roma.rotvec_to_rotmat(aim) @ roma.rotvec_to_rotmat(torch.stack([zero, zero, roll], -1))


def _turns(n: int, roll_range: tuple[float, float], max_aim: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` random :func:`_turn` rotations (float64): roll uniform in ``roll_range = (low, high)``
    (rad), tilt up to ``max_aim`` (rad) uniform over the disc of tilts."""
    lo, hi = roll_range
    roll = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    tilt = max_aim * torch.rand(n, generator=generator, dtype=torch.float64).sqrt()
    direction = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    return _turn(tilt, direction, roll)


def _pool_pixels(camera: Intrinsics, max_roll: float, max_aim: float) -> int:
    """Side (pixels, even) of a pool detector with ``camera``'s pixels that every turn of
    :func:`_turns` can be resampled from without leaving it."""
    h, w = camera.height - 1, camera.width - 1
    corners = torch.tensor([[0.0, 0.0], [w, 0.0], [0.0, h], [w, h]], dtype=torch.float64)
    angles = torch.linspace(-1, 1, 9, dtype=torch.float64)
    roll, direction = torch.meshgrid(angles * max_roll, angles * math.pi, indexing="ij")
    R = _turn(torch.full_like(roll, max_aim), direction, roll).reshape(-1, 1, 3, 3)
    rays = camera.rays(corners)[..., None]  # (4, 3, 1)
    offsets = camera.project((R @ rays)[..., 0]) - torch.tensor([camera.cx, camera.cy], dtype=torch.float64)
    return 2 * math.ceil(float(offsets.abs().max()) + 0.5)


def validation_errors(estimates: torch.Tensor, truths: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Median / mean / p90 3D mTRE (mm) and median rotation error (deg) over a set of views."""
    errors = metrics.mtre(estimates.double(), truths.double(), targets)
    angles = torch.rad2deg(se3.rotation_angle(estimates.double(), truths.double()))
    return {
        "median_mtre_mm": float(errors.median()),
        "mean_mtre_mm": float(errors.mean()),
        "p90_mtre_mm": float(torch.quantile(errors, 0.9)),
        "median_rotation_deg": float(angles.median()),
    }


class Trainer:
    """Trains a :class:`PoseRegressor` on one CT (``hu``: Hounsfield units in ``ct``) against ``targets``
    (``(P, 3)`` points in ``ct``, mm)."""

    def __init__(self, hu: Volume, targets: torch.Tensor, config: TrainConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.targets = targets.double()
        self.center = hu.center
        self.generator = torch.Generator().manual_seed(config.seed)
        self.renderers = [
            Renderer(hu_to_mu(hu, bone_scale=b).coarsened_to(config.voxel_mm), backend="auto", device=self.device)
            for b in config.bone_scales
        ]
        self.camera = config.intrinsics
        # Pool renders are larger, so that any turn (roll and aim) can be resampled into image_size.
        self.views = config.trained_views
        self._roll = tuple(math.radians(g) for g in self.views.roll_deg)
        self._max_aim = math.radians(config.aim_deg)
        pool_px = _pool_pixels(self.camera, max(abs(g) for g in self._roll), self._max_aim)
        self.pool_camera = Intrinsics(
            pool_px, pool_px, self.camera.fx, self.camera.fy, (pool_px - 1) / 2, (pool_px - 1) / 2
        )
        alpha, beta, sod = self.views.centre
        reference = carm_pose(math.radians(alpha), math.radians(beta), 0.0, sod, self.center)
        # Channels-last on a CPU: oneDNN's convolutions run a few percent faster on it (docs/performance.md).
        layout = torch.channels_last if self.device.type == "cpu" else torch.preserve_format
        self.model = PoseRegressor(
            reference, self.center, config.backbone, config.image_size, config.backbone_channels, config.backbone_stem
        ).to(self.device, memory_format=layout)
        auto = config.mixed_precision == "auto"
        self.mixed_precision = bfloat16_is_fast(self.device) if auto else bool(config.mixed_precision)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict] = []
        self.best: dict | None = None
        self._best_state: dict | None = None
        # A ring buffer: renders overwrite the oldest in place (no per-step copy of the whole pool).
        size = (config.pool_size, pool_px, pool_px)
        self._pool_images = torch.empty(size, device=self.device)  # on the training device
        self._pool_poses = torch.empty(config.pool_size, 4, 4, dtype=torch.float64)  # on the CPU, with the sampler
        self._pool_count = self._pool_next = 0
        self.validation = self._make_validation()

    # ----- data -----
    def _render(self, poses: torch.Tensor, camera: Intrinsics, renderer: Renderer) -> torch.Tensor:
        with torch.no_grad():
            return renderer.render(poses.to(self.device), camera).float()

    def _views(self, n: int, roll: bool) -> torch.Tensor:
        views = self.views if roll else self.views.without_roll()
        return sample_views(views, n, self.center, self.generator)[0]

    def _refresh_pool(self, n: int) -> None:
        """Render ``n`` new gamma = 0 views into the pool (evicting the oldest when full)."""
        size = self.config.pool_size
        n = min(n, size)
        renderer = self.renderers[int(torch.randint(len(self.renderers), (1,), generator=self.generator))]
        poses = self._views(n, roll=False)
        images = self._render(poses, self.pool_camera, renderer)
        slots = (self._pool_next + torch.arange(n)) % size
        self._pool_images[slots.to(self.device)] = images
        self._pool_poses[slots] = poses
        self._pool_next = (self._pool_next + n) % size
        self._pool_count = min(size, self._pool_count + n)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch: prepared inputs ``(B, 1, S, S)`` and true poses ``(B, 4, 4)`` (float64)."""
        cfg = self.config
        if self._pool_count < cfg.batch_size:
            self._refresh_pool(cfg.batch_size * 4)
        else:
            self._refresh_pool(cfg.pool_refresh)
        idx = torch.randint(self._pool_count, (cfg.batch_size,), generator=self.generator)
        turns = _turns(cfg.batch_size, self._roll, self._max_aim, self.generator)
        images = self.turned(self._pool_images[idx.to(self.device)], turns)
        poses = self._pool_poses[idx] @ se3.make_pose(turns, torch.zeros(cfg.batch_size, 3, dtype=torch.float64))
        return PoseRegressor.prepare(augment(images, cfg.augment, self.generator)), poses

    def turned(self, pool_images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
        """Working-camera images ``(B, S, S)`` of pool renders ``(B, P, P)`` (on the training device)
        after turning each camera by ``turns`` ``(B, 3, 3)`` about its focal spot (``T [R | 0]``)."""
        grid = self.camera.sampling_grid(self.pool_camera, turns).float().to(self.device)
        return F.grid_sample(pool_images[:, None].float(), grid, mode="bilinear", align_corners=False)[:, 0]

    def _make_validation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out views (own seed), rendered once at full image size with fresh noise."""
        g = torch.Generator().manual_seed(self.config.seed + 10_000)
        poses = sample_views(self.views, self.config.validation_views, self.center, g)[0]
        images = self._render(poses, self.camera, self.renderers[0])
        return PoseRegressor.prepare(augment(images, self.config.augment, g)), poses

    # ----- optimisation -----
    def loss(self, predicted: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss and per-view mTRE (mm): ``mean mTRE + rotation_weight * mean angle (deg)``."""
        errors = metrics.mtre(predicted, truth.to(predicted), self.targets.to(predicted))
        angle = torch.rad2deg(se3.rotation_angle(predicted, truth.to(predicted)))
        return errors.mean() + self.config.rotation_weight * angle.mean(), errors

    def _learning_rate(self, progress: float) -> float:
        warm = min(1.0, (self.step + 1) / self.config.warmup_steps)
        return self.config.learning_rate * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def train_step(self, progress: float) -> dict:
        """One optimisation step at ``progress`` (0..1 of the budget) of the schedule."""
        x, poses = self.batch()
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate(progress)
        self.model.train()
        predicted = self.model(x.to(self.device), mixed_precision=self.mixed_precision).double()
        loss, errors = self.loss(predicted, poses.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item(), "mtre_mm": errors.mean().item()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Errors of the current network on the held-out views."""
        self.model.eval()
        x, poses = self.validation
        predicted = torch.cat([self.model(chunk.to(self.device)).cpu() for chunk in x.split(64)])
        return validation_errors(predicted, poses, self.targets)

    def fit(self, budget_s: float, checkpoint: Path | None = None, progress=None) -> dict:
        """Train until ``budget_s`` seconds (counting resumed time) have passed; returns the best validation.

        ``progress``: an optional callable ``(elapsed_s, info: dict)`` for a progress display.
        """
        start = time.perf_counter() - self.elapsed
        last_val = last_ckpt = self.elapsed
        running = None
        while True:
            self.elapsed = time.perf_counter() - start
            if self.elapsed >= budget_s:
                break
            info = self.train_step(self.elapsed / budget_s)
            running = info["mtre_mm"] if running is None else 0.98 * running + 0.02 * info["mtre_mm"]
            if self.elapsed - last_val >= self.config.validation_every_s:
                self._record_validation()
                last_val = self.elapsed
            if checkpoint is not None and self.elapsed - last_ckpt >= self.config.checkpoint_every_s:
                self.save_checkpoint(checkpoint)
                last_ckpt = self.elapsed
            if progress is not None:
                best = {f"best_{k}": v for k, v in (self.best or {}).items()}
                progress(self.elapsed, {"step": self.step, "loss": info["loss"], "train_mtre_mm": running, **best})
        self._record_validation()
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)
        return self.best

    def _record_validation(self) -> None:
        result = self.validate()
        self.history.append({"seconds": self.elapsed, "step": self.step, **result})
        if self.best is None or result["median_mtre_mm"] < self.best["median_mtre_mm"]:
            self.best = {"step": self.step, "seconds": self.elapsed, **result}
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def best_model(self) -> PoseRegressor:
        """The network at its best validation (the current one if never validated)."""
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        return self.model.eval()

    # ----- checkpoints -----
    def save_checkpoint(self, path: Path) -> None:
        """Weights, best weights and optimiser state (safetensors) plus ``path.json`` with the counters."""
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self._best_state is not None:
            tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in self._best_state.items()})
        opt = self.optimizer.state_dict()
        for i, state in opt["state"].items():
            for name, value in state.items():
                tensors[f"optim.{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
        state = {
            "step": self.step,
            "elapsed": self.elapsed,
            "history": self.history,
            "best": self.best,
            "config": self.config.as_dict(),
            "generator": self.generator.get_state().tolist(),
        }
        Path(str(path) + ".json").write_text(json.dumps(state))

    def load_checkpoint(self, path: Path) -> None:
        """Resume from :meth:`save_checkpoint` files (the configuration must match); ``ValueError``
        naming the file when they are missing, unreadable or not a checkpoint of this trainer."""
        try:
            state = json.loads(Path(str(path) + ".json").read_text())
            tensors = load_file(str(path))
            config = state["config"]
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise ValueError(f"{path} is not a readable training checkpoint (and its .json): {err!r}") from err
        if config != self.config.as_dict():
            raise ValueError(f"checkpoint {path} was made with another training configuration")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        self._best_state = best or None
        opt = self.optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                opt["state"].setdefault(int(i), {})[name] = value
        self.optimizer.load_state_dict(opt)
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.history, self.best = state["history"], state["best"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
