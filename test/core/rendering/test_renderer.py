"""The DRR renderer: backends, batching, sparse pixels, exact line integrals and pose derivatives."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from diffpose_ros.core.geometry import se3
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose
from diffpose_ros.core.rendering.backends.numba_cpu import march_numba, set_renderer_threads, tile_order
from diffpose_ros.core.rendering.derivatives import twist_jacobian
from diffpose_ros.core.rendering.renderer import Renderer, patch_pixels
from diffpose_ros.core.rendering.volume import Volume

EPS = torch.tensor([0.05] * 3 + [5e-5] * 3, dtype=torch.float64)  # mm, rad


def pearson(a, b) -> float:
    a = a.detach().double().flatten()
    b = b.detach().double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def cosine(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a * b).sum() / (a.norm() * b.norm()))


def fd_columns(r: Renderer, T, K, pixels=None):
    """Central finite differences of the image along each right-perturbation twist axis: (N, 6)."""
    cols = []
    for c in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[c] = EPS[c]
        plus = r.render(T @ se3.exp(e), K, pixels).double().flatten()
        minus = r.render(T @ se3.exp(-e), K, pixels).double().flatten()
        cols.append((plus - minus) / (2 * EPS[c]))
    return torch.stack(cols, -1)


@pytest.fixture(scope="module")
def torch_coarse(mu_coarse):
    return Renderer(mu_coarse, backend="torch")


@pytest.fixture(scope="module")
def numba_coarse(mu_coarse):
    return Renderer(mu_coarse, backend="numba")


@pytest.fixture(scope="module")
def jac_and_fd(renderer, torch_coarse, clinical_pose, k64):
    """{backend: (render_jacobian (N, 6), finite differences (N, 6))} at the clinical pose, 64^2."""
    out = {}
    for name, r in (("numba", renderer), ("torch", torch_coarse)):
        _, J = r.render_jacobian(clinical_pose, k64)
        out[name] = (J[0].double(), fd_columns(r, clinical_pose, k64))
    return out


@pytest.fixture(scope="module")
def poses(hu):
    iso = hu.center + torch.tensor([[0.0, 0, 0], [20.0, -10, 30], [-30.0, 25, -15]], dtype=torch.float64)
    a = torch.tensor([0.0, 20.0, -25.0], dtype=torch.float64).deg2rad()
    b = torch.tensor([0.0, -12.0, 15.0], dtype=torch.float64).deg2rad()
    g = torch.tensor([0.0, 6.0, -8.0], dtype=torch.float64).deg2rad()
    return carm_pose(a, b, g, torch.tensor([750.0, 680.0, 830.0], dtype=torch.float64), iso)


# ----------------------------------------------------------------------------- exact line integrals
def _chord_lengths(T, K, A, shape_xyz, margin=0.0, clearance=None):
    """Analytic length (mm) of each pixel ray inside the box of voxel edges (shrunk by ``margin`` voxels).

    With ``clearance`` (voxels), also a mask of the rays that enter and leave the box through face
    points at least that far from the face's edges (where trilinear sampling blurs the box's corners).
    """
    d = K.rays().numpy()  # (N, 3) source frame, z = 1
    R, s = T[:3, :3].numpy(), T[:3, 3].numpy()
    Ainv = np.linalg.inv(A.numpy())
    o = Ainv[:3, :3] @ s + Ainv[:3, 3]
    e = d @ (Ainv[:3, :3] @ R).T
    lo = -0.5 + margin
    hi = np.array(shape_xyz, dtype=float) - 0.5 - margin
    with np.errstate(divide="ignore", invalid="ignore"):
        ta, tb = (lo - o) / e, (hi - o) / e
    t0 = np.maximum(np.minimum(ta, tb).max(-1), 0)
    t1 = np.maximum(ta, tb).min(-1)
    length = np.clip(t1 - t0, 0, None) * np.linalg.norm(d, axis=-1)
    if clearance is None:
        return length
    ok = length > 0
    for t, axis in ((t0, np.minimum(ta, tb).argmax(-1)), (t1, np.maximum(ta, tb).argmin(-1))):
        p = o + t[:, None] * e
        inside = (p >= lo + clearance) & (p <= hi - clearance)
        inside[np.arange(len(p)), axis] = True  # the coordinate across the face itself is on the face
        ok &= inside.all(-1)
    return length, ok


@pytest.mark.parametrize("direction", ["identity", "rotated-flipped"])
def test_uniform_box_gives_mu_times_chord_length(direction):
    nx, ny, nz = 20, 24, 30
    spacing = np.array([2.0, 1.5, 1.0])
    D = np.eye(3) if direction == "identity" else np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, -1]])
    A = np.eye(4)
    A[:3, :3] = D * spacing
    A[:3, 3] = [5.0, -7.0, 12.0]
    A = torch.from_numpy(A)
    mu0 = 0.02
    vol = Volume(torch.full((nz, ny, nx), mu0), A, "box")
    centre = vol.center
    K = Intrinsics(48, 48, 300.0, 300.0, 23.5, 23.5)  # about 80 mm across at the box: the box and its surroundings
    T = carm_pose(
        math.radians(17),
        math.radians(-11),
        math.radians(4),
        400.0,
        centre + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
    )
    img = Renderer(vol, backend="numba").render(T, K).double().flatten().numpy()
    L = _chord_lengths(T, K, A, (nx, ny, nz))
    # Rays entering and leaving 1.5 voxels away from the box's edges: the trilinear integral (with its
    # ramp into the zero padding) equals the chord there, up to the sampling step's error.
    _, robust = _chord_lengths(T, K, A, (nx, ny, nz), clearance=1.5)
    assert robust.sum() > 300 and (~robust & (L > 0)).sum() > 50
    np.testing.assert_allclose(img[robust], mu0 * L[robust], rtol=1e-2)
    assert float(np.median(np.abs(img[robust] / (mu0 * L[robust]) - 1))) < 3e-3
    # Rays that miss the box (with a voxel of margin for the trilinear ramp) are exactly zero.
    outer = _chord_lengths(T, K, A, (nx, ny, nz), margin=-1.0)
    assert (outer == 0).sum() > 50
    assert np.all(img[outer == 0] == 0.0)


def test_rays_missing_the_ct_are_zero(hu, renderer):
    K = Intrinsics(64, 64, 90.0, 90.0, 31.5, 31.5)  # wide field of view: corners miss the CT
    T = carm_pose(0.3, 0.1, 0.0, 750.0, hu.center)
    img = renderer.render(T, K).double().flatten().numpy()
    outer = _chord_lengths(T, K, hu.index_to_ct, hu.shape_xyz, margin=-2.0)
    assert (outer == 0).sum() > 100 and (outer > 0).sum() > 100
    assert np.all(img[outer == 0] == 0.0)
    assert img[outer > 0].max() > 1.0


def test_far_away_or_behind_gives_zeros(hu, renderer, k64, mu_coarse):
    far = carm_pose(0.0, 0.0, 0.0, 750.0, hu.center + torch.tensor([5e4, 0.0, 0.0], dtype=torch.float64))
    behind = carm_pose(0.0, 0.0, 0.0, -750.0, hu.center)  # source beyond the CT, beam pointing away from it
    for r in (renderer, Renderer(mu_coarse, backend="torch")):
        for T in (far, behind):
            img = r.render(T, k64)
            assert img.shape == (64, 64) and bool((img == 0).all())
            L, J = r.render_jacobian(T, k64)
            assert bool(torch.isfinite(J).all()) and float(J.abs().max()) == 0.0
            pose = T.clone().requires_grad_(True)
            r.render(pose, k64).sum().backward()
            assert bool(torch.isfinite(pose.grad).all())


def test_mirrored_intrinsics_render_the_flipped_image(renderer, hu):
    K = Intrinsics.from_detector(1020.0, 64, 64, 4.8, principal_point=(34.0, 30.5))
    T = carm_pose(0.2, -0.1, 0.05, 750.0, hu.center)
    img = renderer.render(T, K)
    flip_x = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    mirrored = renderer.render(T @ flip_x, K.mirrored())
    torch.testing.assert_close(mirrored, img.flip(-1), atol=1e-4, rtol=1e-4)
    assert pearson(img, img.flip(-1)) < 0.99  # the test can see a flip


# ----------------------------------------------------------------------------- backends, batches, sparse pixels
def test_backends_agree(numba_coarse, torch_coarse, poses, k64):
    a = numba_coarse.render(poses, k64)
    b = torch_coarse.render(poses, k64)
    assert a.shape == b.shape == (3, 64, 64)
    for i in range(3):
        assert pearson(a[i], b[i]) > 0.9999
        torch.testing.assert_close(b[i], a[i], rtol=0.01, atol=0.01 * float(a[i].max()))
        assert float(b[i].mean() / a[i].mean()) == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
def test_batch_equals_individual_renders(renderer, torch_coarse, poses, k64):
    for r in (renderer, torch_coarse):
        batch = r.render(poses, k64)
        for i in range(3):
            torch.testing.assert_close(batch[i], r.render(poses[i], k64), atol=1e-5, rtol=1e-5)
        L, J = r.render_jacobian(poses, k64)
        assert L.shape == (3, 64 * 64) and J.shape == (3, 64 * 64, 6)
        torch.testing.assert_close(L.reshape(3, 64, 64), batch, atol=1e-5, rtol=1e-5)
        _, J1 = r.render_jacobian(poses[1], k64)
        torch.testing.assert_close(J[1], J1[0], atol=1e-6, rtol=1e-5)
    # Distinct poses give distinct images (the batch is not one image repeated).
    assert pearson(batch[0], batch[1]) < 0.99


def test_sparse_pixels_equal_dense_image(renderer, torch_coarse, clinical_pose, k64):
    g = torch.Generator().manual_seed(0)
    pix = torch.stack(
        [torch.randint(0, 64, (300,), generator=g), torch.randint(0, 64, (300,), generator=g)], -1
    ).double()
    for r in (renderer, torch_coarse):
        dense = r.render(clinical_pose, k64)
        sparse = r.render(clinical_pose, k64, pix)
        assert sparse.shape == (300,)
        expected = dense[pix[:, 1].long(), pix[:, 0].long()]  # (u, v) = (column, row)
        torch.testing.assert_close(sparse, expected, atol=1e-5, rtol=1e-5)
        L, J = r.render_jacobian(clinical_pose, k64, pix)
        _, Jd = r.render_jacobian(clinical_pose, k64)
        torch.testing.assert_close(J[0], Jd[0, (pix[:, 1] * 64 + pix[:, 0]).long()], atol=1e-6, rtol=1e-4)


def test_tiled_marching_order_gives_the_row_major_image(renderer, clinical_pose):
    order = tile_order(7, 5, tile=4)  # partial tiles on the right and at the bottom
    assert sorted(order.tolist()) == list(range(35))
    assert order[:8].tolist() == [0, 1, 2, 3, 7, 8, 9, 10]  # the first tile, row by row
    K = Intrinsics.from_detector(1020.0, 37, 29, 6.0)  # sizes that no tile divides
    P = renderer.source_to_index(clinical_pose[None])
    dirs = K.rays()
    for with_grad in (False, True):
        tiled = march_numba(renderer._vol, P, dirs, renderer.step_mm, with_grad, tile_order(37, 29))
        rows = march_numba(renderer._vol, P, dirs, renderer.step_mm, with_grad)
        assert torch.equal(tiled, rows)  # each ray is marched alone: only the order changes
    assert float(rows[..., 0].max()) > 1.0  # the rays cross the patient


def test_renderer_threads_are_set_per_thread_and_change_no_pixel(renderer, clinical_pose, k64):
    import numba

    pool = numba.config.NUMBA_NUM_THREADS
    before = numba.get_num_threads()
    expected = renderer.render_jacobian(clinical_pose, k64)
    seen = {}

    def one_thread():
        seen["one"] = set_renderer_threads(1)
        seen["renders"] = renderer.render_jacobian(clinical_pose, k64)
        seen["huge"] = set_renderer_threads(10_000)
        seen["default"] = set_renderer_threads(0)

    thread = threading.Thread(target=one_thread)
    thread.start()
    thread.join()
    assert (seen["one"], seen["huge"], seen["default"]) == (1, pool, pool)
    assert numba.get_num_threads() == before  # the calling thread's count only
    for got, want in zip(seen["renders"], expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_kernel_jacobian_equals_the_tensor_formula(renderer, poses, k64):
    """The kernel's per-ray Jacobian (the numba path of render_jacobian) is twist_jacobian of its accumulators."""
    P = renderer.source_to_index(poses)
    dirs = k64.rays()
    acc = march_numba(renderer._vol, P, dirs, renderer.step_mm, True)
    L, J = twist_jacobian(acc, P, dirs)
    fused = march_numba(renderer._vol, P, dirs, renderer.step_mm, True, jacobian=True)
    assert torch.equal(fused[..., 0], L)
    scale = J.abs().amax(dim=(0, 1))  # per column: mm and rad columns differ by orders of magnitude
    assert bool((scale > 0).all())
    torch.testing.assert_close(fused[..., 1:] / scale, J / scale, atol=1e-6, rtol=0)
    Lr, Jr = renderer.render_jacobian(poses, k64)
    assert torch.equal(Lr, L) and torch.equal(Jr, fused[..., 1:])


CUDA_SIMULATOR_CHECK = textwrap.dedent(
    """
    import torch
    from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose
    from diffpose_ros.core.rendering.renderer import Renderer, patch_pixels
    from diffpose_ros.core.rendering.volume import Volume

    data = torch.rand(10, 12, 14, generator=torch.Generator().manual_seed(0)) * 0.02
    mu = Volume(data, torch.diag(torch.tensor([9.0, 8.0, 11.0, 1.0], dtype=torch.float64)))
    cpu, gpu = Renderer(mu, backend="numba"), Renderer(mu, backend="cuda")
    K = Intrinsics.from_detector(1020.0, 7, 5, 60.0)  # the outer columns miss the volume
    poses = carm_pose(
        torch.tensor([0.2, 1.1]), torch.tensor([0.1, -0.3]), torch.tensor([0.0, 0.4]), 500.0, mu.center
    )
    pixels = patch_pixels(K, torch.tensor([[2, 2], [4, 2]]), 3)
    for p in (None, pixels):
        a, b = cpu.render(poses, K, p), gpu.render(poses, K, p)
        assert float(a.max()) > 1.0 and (p is not None or bool((a == 0).any()))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        (La, Ja), (Lb, Jb) = cpu.render_jacobian(poses, K, p), gpu.render_jacobian(poses, K, p)
        torch.testing.assert_close(Lb, La, rtol=1e-5, atol=1e-6)
        scale = Ja.abs().amax(dim=(0, 1))
        torch.testing.assert_close(Jb / scale, Ja / scale, rtol=0, atol=1e-5)
    grads = []
    for r in (cpu, gpu):
        pose = poses[1].clone().requires_grad_(True)
        r.render(pose, K).square().sum().backward()
        grads.append(pose.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    print("cuda kernel agrees")
    """
)


@pytest.mark.slow
def test_cuda_backend_equals_the_cpu_kernel_in_numbas_simulator():
    """The CUDA kernel (the CPU kernel's per-ray march, compiled for the GPU) run by numba's CUDA
    simulator on the CPU: the same images, Jacobians and pose gradients as the CPU kernel. The
    simulator must be chosen before numba's CUDA target loads, hence a process of its own."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    run = subprocess.run(
        [sys.executable, "-c", CUDA_SIMULATOR_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0 and "cuda kernel agrees" in run.stdout, run.stderr[-3000:]


def test_cuda_backend_needs_a_cuda_device_and_numbas_cuda_target(mu_coarse):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Renderer(mu_coarse, backend="cuda", device="cpu")
    from numba import cuda

    if not cuda.is_available():  # refused when built, not at the first render
        with pytest.raises(ValueError, match="needs numba's CUDA target"):
            Renderer(mu_coarse, backend="cuda", device="cuda")


def test_render_rejects_bad_inputs(mu_coarse, renderer, k64):
    with pytest.raises(ValueError):
        Renderer(mu_coarse, backend="opengl")
    with pytest.raises(ValueError):
        renderer.render(torch.eye(3, dtype=torch.float64), k64)


def test_patch_pixels_layout():
    K = Intrinsics.from_detector(1020.0, 64, 48, 4.8)
    p = patch_pixels(K, torch.tensor([[10, 20], [40, 30]]), 3)
    assert p.shape == (2 * 9, 2)
    first = torch.tensor(
        [[9, 19], [10, 19], [11, 19], [9, 20], [10, 20], [11, 20], [9, 21], [10, 21], [11, 21]], dtype=torch.float64
    )
    torch.testing.assert_close(p[:9], first)  # one patch contiguous, row-major (u fastest)
    torch.testing.assert_close(p[9:], first + torch.tensor([30.0, 10.0], dtype=torch.float64))
    # Patches near the border are moved inside the image, keeping their size.
    q = patch_pixels(K, torch.tensor([[0, 0], [63, 47], [62.6, 1.2]]), 5)
    assert q.shape == (3 * 25, 2)
    assert float(q[:, 0].min()) == 0 and float(q[:, 0].max()) == 63
    assert float(q[:, 1].min()) == 0 and float(q[:, 1].max()) == 47
    torch.testing.assert_close(q[:25].min(0).values, torch.tensor([0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(q[25:50].max(0).values, torch.tensor([63.0, 47.0], dtype=torch.float64))
    # Even sizes: offsets -size/2 .. size/2 - 1.
    e = patch_pixels(K, torch.tensor([[30, 30]]), 4)
    torch.testing.assert_close(e.min(0).values, torch.tensor([28.0, 28.0], dtype=torch.float64))
    torch.testing.assert_close(e.max(0).values, torch.tensor([31.0, 31.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- pose derivatives
def test_numba_jacobian_matches_finite_differences(renderer, clinical_pose, k64, jac_and_fd):
    L, J = renderer.render_jacobian(clinical_pose, k64)
    assert L.shape == (1, 64 * 64) and J.shape == (1, 64 * 64, 6)
    torch.testing.assert_close(L[0], renderer.render(clinical_pose, k64).flatten())
    J, fd = jac_and_fd["numba"]
    for c in range(6):
        assert cosine(J[:, c], fd[:, c]) > 0.999, f"column {c}"
        assert float(J[:, c].norm() / fd[:, c].norm()) == pytest.approx(1.0, abs=0.03), f"column {c}"


def test_torch_jacobian_matches_finite_differences_roughly(jac_and_fd):
    J, fd = jac_and_fd["torch"]
    for c in range(6):
        assert cosine(J[:, c], fd[:, c]) > 0.95, f"column {c}"
        assert float(J[:, c].norm() / fd[:, c].norm()) == pytest.approx(1.0, abs=0.1), f"column {c}"


def test_torch_jacobian_cosine_above_0_99(jac_and_fd):
    J, fd = jac_and_fd["torch"]
    assert min(cosine(J[:, c], fd[:, c]) for c in range(6)) > 0.99


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_autograd_through_exp_matches_jacobian_and_finite_differences(
    backend, renderer, torch_coarse, clinical_pose, k64, jac_and_fd
):
    r = renderer if backend == "numba" else torch_coarse
    threshold = 0.999 if backend == "numba" else 0.95
    J, fd = jac_and_fd[backend]
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 64 * 64, generator=g, dtype=torch.float64)  # 16 random scalar losses <w, image>
    xi = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    img = r.render(clinical_pose @ se3.exp(xi), k64).flatten()
    assert img.requires_grad
    grads = torch.stack([torch.autograd.grad(img, xi, w.to(img.dtype), retain_graph=True)[0] for w in W])  # (16, 6)
    # Autograd and the forward-mode Jacobian are the same derivative.
    torch.testing.assert_close(grads, W @ J, rtol=1e-4, atol=1e-6 * float((W @ J).abs().max()))
    # And both agree with finite differences, column by column.
    expected = W @ fd
    for c in range(6):
        assert cosine(grads[:, c], expected[:, c]) > threshold, f"column {c}"


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_autograd_wrt_pose_matrix(backend, renderer, torch_coarse, clinical_pose, k64):
    r = renderer if backend == "numba" else torch_coarse
    _, J = r.render_jacobian(clinical_pose, k64)
    w = torch.randn(64 * 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pose = clinical_pose.clone().requires_grad_(True)
    (r.render(pose, k64).flatten().double() * w).sum().backward()
    G = pose.grad
    assert G.shape == (4, 4) and G.dtype == torch.float64
    # Directional derivative along T @ hat(e_c) is the derivative along the right-perturbation axis c.
    for c in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[c] = 1.0
        dT = clinical_pose @ torch.autograd.functional.jacobian(se3.exp, torch.zeros(6, dtype=torch.float64))[..., c]
        assert float((G * dT).sum()) == pytest.approx(float(w @ J[0, :, c].double()), rel=1e-4, abs=1e-6)
    # float32 poses get float32 gradients.
    p32 = clinical_pose.float().requires_grad_(True)
    r.render(p32, k64).sum().backward()
    assert p32.grad.dtype == torch.float32 and bool(torch.isfinite(p32.grad).all())
