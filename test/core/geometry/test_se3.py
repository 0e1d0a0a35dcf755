"""SE(3) exp/log, composition, inverse, point transforms and distances (diffpose_ros.core.geometry.se3)."""

from __future__ import annotations

import math

import pytest
import torch

from diffpose_ros.core.geometry import se3


def hat4(xi: torch.Tensor) -> torch.Tensor:
    """4x4 twist matrix of xi = (rho, phi), built independently of se3.skew."""
    rho, phi = xi[..., :3], xi[..., 3:]
    M = torch.zeros(*xi.shape[:-1], 4, 4, dtype=xi.dtype)
    M[..., 0, 1], M[..., 0, 2] = -phi[..., 2], phi[..., 1]
    M[..., 1, 0], M[..., 1, 2] = phi[..., 2], -phi[..., 0]
    M[..., 2, 0], M[..., 2, 1] = -phi[..., 1], phi[..., 0]
    M[..., :3, 3] = rho
    return M


def random_twists(shape, angles, dtype, seed=0):
    """Twists with rotation angles ``angles`` (broadcast to ``shape``) about random axes; rho in +-100 mm."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.randn(*shape, 3, generator=g, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    rho = (torch.rand(*shape, 3, generator=g, dtype=torch.float64) - 0.5) * 200
    phi = axis * torch.as_tensor(angles, dtype=torch.float64).expand(shape)[..., None]
    return torch.cat([rho, phi], -1).to(dtype)


ANGLES = [0.0, 1e-9, 1e-6, 5e-4, 2e-3, 0.3, 1.5, 3.0, math.pi - 1e-3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(), (7,), (2, 3)])
def test_exp_matches_matrix_exponential(dtype, shape):
    # Independent oracle: torch.linalg.matrix_exp of the 4x4 twist matrix, in float64.
    rot_tol, t_tol = (1e-12, 1e-9) if dtype == torch.float64 else (1e-6, 5e-3)
    for i, angle in enumerate(ANGLES):
        xi = random_twists(shape, angle, dtype, seed=i)
        T = se3.exp(xi)
        assert T.shape == (*shape, 4, 4) and T.dtype == dtype
        ref = torch.linalg.matrix_exp(hat4(xi.double()))
        torch.testing.assert_close(T[..., :3, :3].double(), ref[..., :3, :3], atol=rot_tol, rtol=0)
        torch.testing.assert_close(T[..., :3, 3].double(), ref[..., :3, 3], atol=t_tol, rtol=0)
        torch.testing.assert_close(T[..., 3, :].double(), ref[..., 3, :], atol=0, rtol=0)


def _round_trip_params():
    for dtype in (torch.float64, torch.float32):
        for angle in ANGLES + [1e-2, 0.05]:
            yield pytest.param(dtype, angle, id=f"{str(dtype)[6:]}-{angle:.3g}")


@pytest.mark.parametrize("dtype,angle", list(_round_trip_params()))
@pytest.mark.parametrize("shape", [(), (9,), (2, 4)])
def test_log_exp_round_trip(dtype, angle, shape):
    xi = random_twists(shape, angle, dtype, seed=10)
    back = se3.log(se3.exp(xi))
    assert back.shape == xi.shape and back.dtype == dtype
    assert torch.isfinite(back).all()
    # rho in +-100 mm: float64 to 1e-7 mm, float32 to 1e-3 mm; phi to 1e-9 / 1e-6 rad.
    rot_tol, rho_tol = (1e-9, 1e-7) if dtype == torch.float64 else (1e-6, 1e-3)
    torch.testing.assert_close(back[..., 3:], xi[..., 3:], atol=rot_tol, rtol=0)
    torch.testing.assert_close(back[..., :3], xi[..., :3], atol=rho_tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exp_log_round_trip_on_poses(dtype):
    # exp(log(T)) == T for poses with any rotation angle in [0, pi), including identity and tiny ones.
    angles = ANGLES
    rot_tol, t_tol = (1e-12, 1e-7) if dtype == torch.float64 else (1e-6, 2e-3)
    for i, angle in enumerate(angles):
        T = se3.exp(random_twists((5,), angle, torch.float64, seed=20 + i))
        T2 = se3.exp(se3.log(T.to(dtype)))
        torch.testing.assert_close(T2[..., :3, :3].double(), T[..., :3, :3], atol=rot_tol, rtol=0)
        torch.testing.assert_close(T2[..., :3, 3].double(), T[..., :3, 3], atol=t_tol, rtol=0)


def test_log_angle_in_zero_pi():
    # A rotation by 3pi/2 about z is a rotation by pi/2 about -z.
    T = se3.exp(torch.tensor([0.0, 0, 0, 0, 0, 1.5 * math.pi], dtype=torch.float64))
    phi = se3.log(T)[3:]
    torch.testing.assert_close(phi, torch.tensor([0.0, 0, -0.5 * math.pi], dtype=torch.float64), atol=1e-12, rtol=0)


def test_exp_pure_translation():
    rho = torch.tensor([[12.5, -3.0, 700.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    T = se3.exp(torch.cat([rho, torch.zeros(2, 3, dtype=torch.float64)], -1))
    torch.testing.assert_close(T[:, :3, :3], torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    torch.testing.assert_close(T[:, :3, 3], rho)
    torch.testing.assert_close(T[:, 3], torch.tensor([0.0, 0, 0, 1], dtype=torch.float64).expand(2, 4))


def test_exp_known_screw_motion():
    # Rotation by pi/2 about z with rho along x: translation is V rho = (sin t / t, (1 - cos t)/t, 0) * |rho|.
    t = math.pi / 2
    T = se3.exp(torch.tensor([10.0, 0, 0, 0, 0, t], dtype=torch.float64))
    expected = torch.tensor([10 * math.sin(t) / t, 10 * (1 - math.cos(t)) / t, 0.0], dtype=torch.float64)
    torch.testing.assert_close(T[:3, 3], expected)
    torch.testing.assert_close(
        T[:3, :3], torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64), atol=1e-15, rtol=0
    )


def test_right_perturbation_acts_in_the_source_frame():
    T = se3.exp(random_twists((), 1.0, torch.float64, seed=3))
    moved = se3.compose(T, se3.exp(torch.tensor([0.0, 0, 5.0, 0, 0, 0], dtype=torch.float64)))
    # Moving 5 mm along the frame's own z axis (the principal ray for T_ct_source).
    torch.testing.assert_close(moved[:3, 3], T[:3, 3] + 5.0 * T[:3, 2])
    torch.testing.assert_close(moved[:3, :3], T[:3, :3])


def test_compose_inverse_identity():
    A = se3.exp(random_twists((4,), 2.0, torch.float64, seed=4))
    B = se3.exp(random_twists((4,), 0.7, torch.float64, seed=5))
    C = se3.exp(random_twists((4,), 3.1, torch.float64, seed=6))
    eye = torch.eye(4, dtype=torch.float64).expand(4, 4, 4)
    torch.testing.assert_close(se3.compose(A, se3.inverse(A)), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(se3.compose(se3.inverse(A), A), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(se3.inverse(se3.inverse(A)), A)
    torch.testing.assert_close(se3.compose(A, B, C), A @ B @ C)
    torch.testing.assert_close(se3.inverse(se3.compose(A, B)), se3.compose(se3.inverse(B), se3.inverse(A)))
    torch.testing.assert_close(se3.inverse(A), torch.linalg.inv(A))


def test_make_pose_and_skew():
    a = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    b = torch.tensor([-4.0, 0.5, 1.5], dtype=torch.float64)
    torch.testing.assert_close(se3.skew(a) @ b, torch.linalg.cross(a, b))
    R = se3.exp(torch.tensor([0, 0, 0, 0.1, 0.2, 0.3], dtype=torch.float64))[:3, :3]
    T = se3.make_pose(R.expand(2, 3, 3), torch.tensor([[1.0, 2, 3], [4, 5, 6]], dtype=torch.float64))
    assert T.shape == (2, 4, 4)
    torch.testing.assert_close(T[1, :3, 3], torch.tensor([4.0, 5, 6], dtype=torch.float64))
    torch.testing.assert_close(T[:, 3], torch.tensor([0.0, 0, 0, 1], dtype=torch.float64).expand(2, 4))


def test_transform_points_matches_matrix_product():
    T = se3.exp(random_twists((3,), 1.3, torch.float64, seed=7))
    p = torch.randn(3, 11, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 100
    homog = torch.cat([p, torch.ones(3, 11, 1, dtype=torch.float64)], -1)
    expected = (T @ homog.transpose(-1, -2)).transpose(-1, -2)[..., :3]
    torch.testing.assert_close(se3.transform_points(T, p), expected)
    # One pose for many points, and broadcasting of a single pose over a batch of point sets.
    torch.testing.assert_close(se3.transform_points(T[0], p[0]), expected[0])


@pytest.mark.parametrize(
    "xi",
    [
        torch.zeros(6, dtype=torch.float64),
        torch.tensor([1.0, -2.0, 3.0, 1e-5, -2e-5, 1e-5], dtype=torch.float64),
        torch.tensor([10.0, 5.0, -3.0, 0.4, -0.9, 0.2], dtype=torch.float64),
    ],
    ids=["zero", "tiny-angle", "random"],
)
def test_exp_gradcheck(xi):
    x = xi.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(se3.exp, (x,), eps=1e-6, atol=1e-6)
    # The gradient itself is finite at zero (no 0/0 in the Taylor branch).
    g = torch.autograd.functional.jacobian(se3.exp, x)
    assert torch.isfinite(g).all()


def test_exp_jacobian_at_zero_is_the_generators():
    J = torch.autograd.functional.jacobian(se3.exp, torch.zeros(6, dtype=torch.float64))  # (4, 4, 6)
    for i in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[i] = 1.0
        torch.testing.assert_close(J[..., i], hat4(e))


def test_log_gradcheck_away_from_singularities():
    T = se3.exp(torch.tensor([5.0, -1.0, 2.0, 0.5, 0.3, -0.8], dtype=torch.float64)).requires_grad_(True)
    # Only the rotation block and translation matter; perturb the full matrix entries through exp.
    xi = torch.tensor([0.3, 0.1, -0.2, 0.05, -0.02, 0.04], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: se3.log(T.detach() @ se3.exp(x)), (xi,), eps=1e-6, atol=1e-5)


def test_rotation_angle_known():
    def Rz(t):
        return se3.exp(torch.tensor([0, 0, 0, 0, 0, t], dtype=torch.float64))

    torch.testing.assert_close(se3.rotation_angle(Rz(0.0), Rz(0.7)), torch.tensor(0.7, dtype=torch.float64))
    torch.testing.assert_close(se3.rotation_angle(Rz(-0.4), Rz(0.7)), torch.tensor(1.1, dtype=torch.float64))
    # Going the long way round: 350 deg apart is 10 deg.
    torch.testing.assert_close(
        se3.rotation_angle(Rz(math.radians(-175)), Rz(math.radians(175))),
        torch.tensor(math.radians(10), dtype=torch.float64),
    )
    A = se3.exp(random_twists((), 1.0, torch.float64, seed=8))
    torch.testing.assert_close(se3.rotation_angle(A, A @ Rz(0.25)), torch.tensor(0.25, dtype=torch.float64))
    # Translation does not enter the rotation angle.
    Tt = se3.exp(torch.tensor([100.0, 0, 0, 0, 0, 0], dtype=torch.float64))
    assert float(se3.rotation_angle(A, Tt @ A)) < 1e-6


def test_translation_and_double_geodesic_known():
    Ta = torch.eye(4, dtype=torch.float64)
    Tb = se3.make_pose(
        se3.exp(torch.tensor([0, 0, 0, 0, 0, 0.3], dtype=torch.float64))[:3, :3],
        torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64),
    )
    r = 510.0
    torch.testing.assert_close(se3.translation_distance(Ta, Tb), torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(
        se3.double_geodesic(Ta, Tb, r), torch.tensor(math.hypot(r * 0.3, 5.0), dtype=torch.float64)
    )
    # Pure rotation: r * angle; pure translation: |dt|; symmetric.
    Tr = se3.exp(torch.tensor([0, 0, 0, 0.1, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(se3.double_geodesic(Ta, Tr, r), torch.tensor(51.0, dtype=torch.float64))
    torch.testing.assert_close(se3.double_geodesic(Tb, Ta, r), se3.double_geodesic(Ta, Tb, r))
    # Batched.
    d = se3.double_geodesic(torch.stack([Ta, Ta]), torch.stack([Tb, Tr]), r)
    torch.testing.assert_close(d, torch.tensor([math.hypot(r * 0.3, 5.0), 51.0], dtype=torch.float64))
