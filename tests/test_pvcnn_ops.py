"""PVCNN ops vs slow, obviously-correct Python loops (reference kernel semantics), torch vs
CPU fast paths, and gradients."""

import numpy as np
import pytest
import torch

from scripts.networks.pvcnn_ops import (
    avg_voxelize,
    ball_query,
    furthest_point_sample,
    group,
    normalize_voxel_coords,
    three_nn,
    three_nn_interpolate,
    trilinear_devoxelize,
)




def sq(a, b):
    """Kernel formula in float32: (dx*dx + dy*dy) + dz*dz."""
    d = [np.float32(a[i]) - np.float32(b[i]) for i in range(3)]
    return (d[0] * d[0] + d[1] * d[1]) + d[2] * d[2]


def fps_loop(p, m):
    dist, idx = [np.float32(1e10)] * len(p), [0]
    for _ in range(1, m):
        last = p[idx[-1]]
        dist = [min(dist[j], sq(p[j], last)) for j in range(len(p))]
        best = 0
        for j in range(len(p)):
            if dist[j] > dist[best]:
                best = j
        idx.append(best)
    return idx


def ball_query_loop(c, p, radius, k):
    r2 = np.float32(radius * radius)
    out = []
    for ci in c:
        hits = [j for j in range(len(p)) if sq(ci, p[j]) < r2][:k]
        out.append(hits + [hits[0] if hits else 0] * (k - len(hits)))
    return out


def three_nn_loop(u, kn):
    return [sorted(range(len(kn)), key=lambda j: (sq(ui, kn[j]), j))[:3] for ui in u]


def devox_loop(grid, coords):
    """PVCNN kernel: floor corner, fractional weights, upper corner = lower one if frac == 0."""
    c, r = grid.shape[0], grid.shape[1]
    out = np.zeros((c, coords.shape[1]))
    for i in range(coords.shape[1]):
        x = coords[:, i]
        lo = np.floor(x).astype(int)
        f = x - lo
        for corner in np.ndindex(2, 2, 2):
            w = np.prod([f[a] if corner[a] else 1 - f[a] for a in range(3)])
            v = [min(lo[a] + (corner[a] if f[a] > 0 else 0), r - 1) for a in range(3)]
            out[:, i] += w * grid[:, v[0], v[1], v[2]]
    return out


def cloud(b, n, seed, dup=0):
    """Random points, the last ``dup`` duplicating earlier ones (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, n, 3, generator=g) * 2 - 1
    if dup:
        x[:, n - dup:] = x[:, :dup]
    return x


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_fps_matches_loop_incl_ties(backend):
    x = cloud(2, 60, 0, dup=20)
    x[1, 30:] = x[1, 30]  # many identical points: ties at distance 0 after the first pick
    idx = furthest_point_sample(x, 40, backend=backend)
    assert idx.dtype == torch.long and idx.shape == (2, 40)
    for b in range(2):
        assert idx[b].tolist() == fps_loop(x[b].numpy(), 40)
    assert idx[:, 0].eq(0).all()


def test_fps_backends_agree_and_validate():
    x = cloud(3, 500, 1)
    assert torch.equal(furthest_point_sample(x, 128, "numpy"), furthest_point_sample(x, 128, "torch"))
    with pytest.raises(ValueError, match="num_samples"):
        furthest_point_sample(x, 501)
    with pytest.raises(ValueError, match="xyz"):
        furthest_point_sample(x.transpose(1, 2), 5)


@pytest.mark.parametrize("backend", ["torch", "kdtree"])
def test_ball_query_matches_loop(backend):
    p = cloud(2, 80, 2, dup=10)
    c = torch.cat([p[:, :12], torch.full((2, 2, 3), 5.0)], dim=1)  # two centres without neighbours
    for radius, k in ((0.3, 4), (0.6, 50), (0.6, 100)):  # k below, around and above the hit counts / N
        idx = ball_query(c, p, radius, k, backend=backend)
        assert idx.shape == (2, 14, k) and idx.dtype == torch.long
        for b in range(2):
            assert idx[b].tolist() == ball_query_loop(c[b].numpy(), p[b].numpy(), radius, k)
        assert idx[:, 12:].eq(0).all()


def test_ball_query_strict_radius():
    p = torch.tensor([[[0.0, 0, 0], [0.5, 0, 0], [0.25, 0, 0]]])
    c = torch.zeros(1, 1, 3)
    for backend in ("torch", "kdtree"):  # point 1 lies exactly on the sphere: excluded (strict <)
        assert ball_query(c, p, 0.5, 3, backend=backend).tolist() == [[[0, 2, 0]]]


def test_ball_query_kdtree_equals_torch_on_larger_cloud():
    p = cloud(2, 3000, 3, dup=300)
    c = p[:, furthest_point_sample(p, 700)[0]]
    for radius, k in ((0.05, 8), (0.15, 32)):
        assert torch.equal(ball_query(c, p, radius, k, "torch"), ball_query(c, p, radius, k, "kdtree"))


@pytest.mark.parametrize("backend", ["torch", "kdtree"])
def test_three_nn_matches_loop_with_ties(backend):
    kn = cloud(2, 40, 4, dup=15)
    u = torch.cat([cloud(2, 30, 5), kn[:, :10]], dim=1)  # queries on known points: distance 0 + duplicate
    idx, d = three_nn(u, kn, backend)
    for b in range(2):
        ref = three_nn_loop(u[b].numpy(), kn[b].numpy())
        assert idx[b].tolist() == ref
        ref_d = [[sq(u[b, i].numpy(), kn[b, j].numpy()) for j in r] for i, r in enumerate(ref)]
        assert torch.equal(d[b], torch.tensor(ref_d, dtype=torch.float32))


def test_three_nn_kdtree_many_exact_ties_falls_back_exactly():
    # 30 copies of the nearest point: more ties than KD-tree candidates; lowest indices must win
    kn = torch.cat([torch.rand(1, 20, 3) + 3, torch.zeros(1, 30, 3)], dim=1)
    u = torch.full((1, 5, 3), 0.01)
    idx, _ = three_nn(u, kn, "kdtree")
    assert idx.tolist() == [[[20, 21, 22]] * 5]
    kn2 = cloud(2, 2000, 6, dup=500)
    u2 = cloud(2, 1500, 7)
    assert all(torch.equal(a, b) for a, b in zip(three_nn(u2, kn2, "kdtree"), three_nn(u2, kn2, "torch")))


def test_three_nn_fewer_than_three_known():
    kn = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0]]])
    u = torch.tensor([[[0.2, 0, 0]]])
    idx, d = three_nn(u, kn)
    assert idx.tolist() == [[[0, 1, 0]]] and torch.isinf(d[0, 0, 2])
    f = torch.tensor([[[2.0, 4.0]]])
    w0, w1 = 1 / 0.04, 1 / 0.64  # inverse squared distances; the missing neighbour weighs ~0
    expected = (2 * w0 + 4 * w1) / (w0 + w1)
    assert three_nn_interpolate(u, kn, f).item() == pytest.approx(expected, rel=1e-6)


def test_three_nn_interpolate_matches_loop():
    kn, u = cloud(2, 25, 8), cloud(2, 40, 9)
    f = torch.randn(2, 5, 25, generator=torch.Generator().manual_seed(0))
    out = three_nn_interpolate(u, kn, f)
    for b in range(2):
        for i, r in enumerate(three_nn_loop(u[b].numpy(), kn[b].numpy())):
            w = np.array([1.0 / max(float(sq(u[b, i].numpy(), kn[b, j].numpy())), 1e-10) for j in r])
            w /= w.sum()
            ref = sum(w[a] * f[b, :, j].double() for a, j in enumerate(r))
            torch.testing.assert_close(out[b, :, i].double(), ref, rtol=1e-5, atol=1e-6)


def test_interpolation_exact_at_known_points():
    kn = cloud(1, 30, 10)
    f = torch.randn(1, 4, 30, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(three_nn_interpolate(kn, kn, f), f, rtol=1e-5, atol=1e-5)


def test_group_matches_indexing():
    f = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(2))
    idx = torch.randint(0, 10, (2, 6, 3), generator=torch.Generator().manual_seed(3))
    out = group(f, idx)
    assert out.shape == (2, 4, 6, 3)
    for b, m, k in np.ndindex(2, 6, 3):
        assert torch.equal(out[b, :, m, k], f[b, :, idx[b, m, k]])


def test_normalize_voxel_coords_formula():
    x = cloud(2, 50, 11).transpose(1, 2).double() * 3 + 1
    for normalize in (True, False):
        out = normalize_voxel_coords(x, 16, normalize=normalize, eps=1e-3).numpy()
        for b in range(2):
            c = x[b].numpy() - x[b].numpy().mean(axis=1, keepdims=True)
            c = c / (np.linalg.norm(c, axis=0).max() * 2 + 1e-3) + 0.5 if normalize else (c + 1) / 2
            np.testing.assert_allclose(out[b], np.clip(c * 16, 0, 15), rtol=1e-12, atol=1e-12)


def test_avg_voxelize_matches_loop_with_border_points():
    # Dyadic, symmetric cloud: mean exactly 0, max norm 1, R = 4 -> voxel coordinate 2 x + 2,
    # exact in float. 0.25 / -0.25 land on 2.5 / 1.5 (round half to even -> 2), 0.75 on 3.5
    # and 1 on 4 (both clamped to 3); y = z = 0 land on voxel 2.
    xs = [-1.0, 1.0, 0.25, -0.25, 0.75, -0.75, 0.125, 0.125, -0.25]
    coords = torch.tensor([[xs, [0.0] * 9, [0.0] * 9]])
    f = torch.arange(18, dtype=torch.float32).view(1, 2, 9)
    grid, norm = avg_voxelize(f, coords, 4)
    assert grid.shape == (1, 2, 4, 4, 4)
    assert norm[0, 0].tolist() == [0.0, 3, 2.5, 1.5, 3, 0.5, 2.25, 2.25, 1.5]
    assert norm[0, 1:].eq(2).all()
    expected = torch.tensor([(0 + 5) / 2, 0, (2 + 3 + 6 + 7 + 8) / 5, (1 + 4) / 2])
    torch.testing.assert_close(grid[0, 0, :, 2, 2], expected)
    g2, n2 = avg_voxelize(f.double(), cloud(1, 9, 12).transpose(1, 2).double(), 3)
    for grid_, norm_, feats in ((grid, norm, f), (g2, n2, f.double())):
        r = grid_.shape[-1]
        ref = np.zeros(grid_.shape[1:])
        cnt = np.zeros((r, r, r))
        for i in range(feats.shape[2]):
            v = tuple(round(float(norm_[0, a, i])) for a in range(3))  # Python round: half to even
            ref[(slice(None),) + v] += feats[0, :, i].numpy()
            cnt[v] += 1
        np.testing.assert_allclose(grid_[0].numpy(), ref / np.maximum(cnt, 1), rtol=1e-6)


def test_trilinear_devoxelize_matches_kernel_loop():
    g = torch.Generator().manual_seed(4)
    grid = torch.randn(2, 3, 5, 5, 5, generator=g, dtype=torch.float64)
    coords = torch.rand(2, 3, 40, generator=g, dtype=torch.float64) * 4
    # grid nodes, cell faces and the max corner
    coords[:, :, :6] = torch.tensor([0.0, 4.0, 2.0, 1.5, 4.0, 3.0], dtype=torch.float64)
    out = trilinear_devoxelize(grid, coords, 5)
    for b in range(2):
        ref = devox_loop(grid[b].numpy(), coords[b].numpy())
        np.testing.assert_allclose(out[b].numpy(), ref, rtol=1e-10, atol=1e-10)


def test_gradients():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.randint(0, 7, (2, 4, 3), generator=g)
    assert torch.autograd.gradcheck(lambda t: group(t, idx), (f,))
    kn, u = cloud(2, 7, 14).double(), cloud(2, 9, 15).double()
    assert torch.autograd.gradcheck(lambda t: three_nn_interpolate(u, kn, t), (f,))
    coords = cloud(2, 7, 16).transpose(1, 2).double()
    assert torch.autograd.gradcheck(lambda t: avg_voxelize(t, coords, 3)[0], (f,))
    grid = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    norm = (torch.rand(2, 3, 6, dtype=torch.float64, generator=g) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: trilinear_devoxelize(t, norm, 4), (grid,))
    out = trilinear_devoxelize(grid, norm, 4)
    assert torch.autograd.grad(out.sum(), norm, allow_unused=True)[0] is None  # no gradient to coordinates


def test_bad_arguments():
    p = cloud(1, 10, 17)
    with pytest.raises(ValueError, match="backend"):
        ball_query(p, p, 0.1, 4, backend="cuda")
    with pytest.raises(ValueError, match="radius"):
        ball_query(p, p, 0.0, 4)
    with pytest.raises(ValueError, match="batch"):
        three_nn(p, cloud(2, 10, 18))
    with pytest.raises(ValueError, match="coords"):
        avg_voxelize(torch.zeros(1, 2, 10), torch.zeros(1, 3, 9), 4)
    with pytest.raises(ValueError, match="resolution"):
        trilinear_devoxelize(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 3, 5), 5)
