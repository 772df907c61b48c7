"""Dual point map rendering on analytic scenes with exact answers, and CPU/GPU parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dualpm.camera import projection_from_focal
from dualpm.errors import BackendUnavailable
from dualpm.render import render_dual_pointmaps, render_layers, resolve_backend
from dualpm.store.encoding import SparseDualPointMap, sparse_dual_pointmap

H = W = 32
FOCAL = 36.0  # mm -> cot(fov/2) = 2


def translate(z: float) -> torch.Tensor:
    view = torch.eye(4)
    view[2, 3] = z
    return view


def quad(x0, x1, y0, y1, z):
    verts = torch.tensor([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    return verts, faces


def box(half: float = 1.0):
    corners = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=torch.float32) * half
    faces = torch.tensor(
        [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
         [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]
    )
    return corners, faces


def pixel_ray_slopes(height: int, width: int, cot: float):
    """x/(-z) and y/(-z) of the ray through each pixel centre for our projection (row 0 = top)."""
    ndc_x = (torch.arange(width, dtype=torch.float64) + 0.5) * 2 / width - 1
    ndc_y = (torch.arange(height, dtype=torch.float64) + 0.5) * 2 / height - 1
    sx = (ndc_x / cot)[None, :].expand(height, width)
    sy = (-ndc_y / cot)[:, None].expand(height, width)  # negated y row: row 0 looks up
    return sx, sy


def render(canon, posed, faces, view, layers=3, backend="cpu", workers=1, focal=FOCAL, size=(H, W), sparse=False):
    proj = projection_from_focal(torch.tensor([focal] * view.shape[0]), aspect=size[1] / size[0])
    return render_dual_pointmaps(canon, posed, faces, view, proj, size, layers, backend=backend, workers=workers,
                                 sparse=sparse)


def test_quad_covers_known_rectangle_with_exact_points():
    # Camera at z=+5 looking down -Z at a quad in the world plane z=0. Ray slopes are (j+0.5)/16-1
    # over cot=2, so edges at multiples of 1/8 slope lie between pixel centres.
    d = 5.0
    verts, faces = quad(-0.5 * d / 2, 0.25 * d / 2, -0.125 * d / 2, 0.375 * d / 2, 0.0)
    canon = verts * 2 + torch.tensor([1.0, -2.0, 3.0])  # affine in the quad -> exactly interpolated
    out = render(canon, verts[None], faces, translate(-d)[None])[0]  # (H, W, L, 7)

    sx, sy = pixel_ray_slopes(H, W, 2.0)
    X, Y = sx * d, sy * d  # world hit point on z=0 of each pixel's ray
    inside = (X > verts[0, 0]) & (X < verts[1, 0]) & (Y > verts[0, 1]) & (Y < verts[2, 1])
    assert inside.sum() == (W * 0.375) * (H * 0.25)  # the rectangle of pixels, 12 x 8
    assert torch.equal(out[..., 0, 6].bool(), inside)
    assert not out[..., 1:, :].any(), "a single quad has exactly one layer"

    posed = out[..., 0, 3:6][inside].double()
    expected = torch.stack([X[inside], Y[inside], torch.zeros_like(X[inside])], dim=-1)  # z: -5 minus view[2,3]=-5
    torch.testing.assert_close(posed, expected, atol=2e-6, rtol=0)
    expected_canon = expected * 2 + torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(out[..., 0, 0:3][inside].double(), expected_canon, atol=5e-6, rtol=0)
    assert not out[~inside].any(), "uncovered pixels are all zeros"


def test_closed_box_gives_two_layers_at_exact_depths():
    d = 5.0
    verts, faces = box(1.0)
    out = render(verts, verts[None], faces, translate(-d)[None], layers=4)[0]
    sx, sy = pixel_ray_slopes(H, W, 2.0)
    # rays entering the front face (camera z=-4) and leaving through the back face (camera z=-6)
    through = (sx.abs() * 6 < 1) & (sy.abs() * 6 < 1)
    assert through.sum() > 20
    alpha = out[..., 6]
    assert torch.all(alpha[through][:, :2] == 1) and torch.all(alpha[through][:, 2:] == 0)
    front, back = out[..., 0, :][through], out[..., 1, :][through]
    torch.testing.assert_close(front[:, 2], torch.ones(len(front)), atol=1e-6, rtol=0)  # canonical z of front face
    torch.testing.assert_close(back[:, 2], -torch.ones(len(back)), atol=1e-6, rtol=0)
    # posed z after subtracting view[2,3] = -5: front -4+5 = 1, back -6+5 = -1; x, y along the ray
    torch.testing.assert_close(front[:, 5], torch.ones(len(front)), atol=1e-5, rtol=0)
    torch.testing.assert_close(back[:, 3].double(), 6 * sx[through], atol=1e-5, rtol=0)
    torch.testing.assert_close(back[:, 4].double(), 6 * sy[through], atol=1e-5, rtol=0)
    # every covered pixel of a closed convex box has exactly two layers
    covered = alpha[..., 0] == 1
    assert torch.all(alpha[covered][:, 1] == 1) and not alpha[..., 2:].any()


def test_layers_are_ordered_front_to_back_and_skip_equal_depths():
    # Two stacked quads plus a duplicate of the front one: the duplicate must not become a layer.
    d = 5.0
    v1, f1 = quad(-1, 1, -1, 1, 0.5)
    v2, f2 = quad(-2, 2, -2, 2, -0.5)  # larger: covers every pixel the front quad covers
    verts = torch.cat([v1, v2, v1])
    faces = torch.cat([f1, f2 + 4, f1 + 8])
    out = render(verts, verts[None], faces, translate(-d)[None], layers=3)[0]
    covered = (out[..., 0, 6] == 1) & (out[..., 0, 2] > 0)  # first layer on the front quad (canonical z 0.5)
    assert covered.sum() > 50
    assert torch.all(out[..., 1, 6][covered] == 1) and not out[..., 2, :].any()
    assert torch.all(out[..., 1, 6][~covered] == 0), "behind the back quad there is nothing"
    torch.testing.assert_close(out[..., 0, 5][covered], torch.full((int(covered.sum()),), 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., 1, 5][covered], torch.full((int(covered.sum()),), -0.5), atol=1e-5, rtol=0)


def test_object_behind_camera_renders_empty():
    verts, faces = box(0.5)
    out = render(verts, verts[None], faces, translate(+5.0)[None])  # box at camera z=+5: behind
    assert not out.any()


def test_degenerate_triangles_are_ignored():
    verts, faces = quad(-1, 1, -1, 1, 0.0)
    # zero-area triangles right in front of the quad: collinear points and a repeated vertex
    extra = torch.tensor([[-1, -1, 1.0], [0, 0, 1.0], [1, 1, 1.0], [0.2, 0.3, 1.0]])
    all_verts = torch.cat([verts, extra])
    degenerate = torch.tensor([[4, 5, 6], [7, 7, 5], [4, 4, 4]])
    with_deg = render(all_verts, all_verts[None], torch.cat([faces, degenerate]), translate(-5.0)[None])
    plain = render(verts, verts[None], faces, translate(-5.0)[None])
    assert plain[..., 0, 6].sum() > 100
    torch.testing.assert_close(with_deg, plain, atol=0, rtol=0)


def test_batch_instanced_range_mode_and_workers_agree():
    v_box, f_box = box(1.0)
    v_quad, f_quad = quad(-1, 1, -0.5, 0.5, 0.0)
    angle = math.radians(30)
    rot = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    views = torch.stack([translate(-5.0), translate(-6.0)])
    posed = torch.stack([v_box, v_box @ rot.T])
    single = [render(v_box, posed[b : b + 1], f_box, views[b : b + 1]) for b in range(2)]
    batched = render(v_box, posed, f_box, views)  # instanced (shared topology)
    torch.testing.assert_close(batched, torch.cat(single), atol=0, rtol=0)
    parallel = render(v_box, posed, f_box, views, workers=2)
    torch.testing.assert_close(parallel, batched, atol=0, rtol=0)
    # different meshes in one batch (range mode on the GPU)
    mixed = render([v_box, v_quad], [v_box, v_quad], [f_box, f_quad], views)
    torch.testing.assert_close(mixed[0], single[0][0], atol=0, rtol=0)
    torch.testing.assert_close(mixed[1], render(v_quad, v_quad[None], f_quad, views[1:2])[0], atol=0, rtol=0)


def test_sparse_maps_are_the_dense_maps_split():
    # Two layers of a box (seen turned, so layers differ per pixel), a quad, and a mesh outside the view:
    # the cpu backend's sparse maps are exactly what splitting its dense maps gives, in the stored order.
    v_box, f_box = box(1.0)
    v_quad, f_quad = quad(-1, 1, -0.5, 0.5, 0.0)
    v_far, f_far = quad(50, 51, 50, 51, 0.0)
    angle = math.radians(35)
    rot = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    args = ([v_box, v_quad, v_far], [v_box @ rot.T, v_quad, v_far], [f_box, f_quad, f_far],
            torch.stack([translate(-5.0), translate(-4.0), translate(-5.0)]))
    dense = render(*args, layers=4).numpy()
    for workers in (1, 2):
        sparse = render(*args, layers=4, workers=workers, sparse=True)
        assert len(sparse) == 3 and all(isinstance(m, SparseDualPointMap) for m in sparse)
        for got, want in zip(sparse, dense, strict=True):
            counts, values = sparse_dual_pointmap(want, "float32")
            assert got.layers == 4 and got.shape == want.shape
            np.testing.assert_array_equal(got.counts, counts)
            np.testing.assert_array_equal(got.values, values)
            np.testing.assert_array_equal(got.dense(), want)
    assert sparse[0].counts.max() == 2 and sparse[1].counts.max() == 1 and sparse[2].counts.sum() == 0
    with pytest.raises(ValueError, match="3 attribute channels"):
        render_layers(torch.zeros(8, 5), v_box[None], f_box, translate(-5.0)[None],
                      projection_from_focal(torch.tensor([FOCAL])), (H, W), 2, "cpu", 1, sparse=True)


def test_non_square_resolution_and_row_zero_is_top():
    # A quad only in the upper half of the world (y > 0) must land in the top rows (small row index).
    verts, faces = quad(-0.5, 0.5, 0.2, 1.0, 0.0)
    out = render(verts, verts[None], faces, translate(-5.0)[None], size=(24, 40))[0]
    rows = out[..., 0, 6].nonzero()[:, 0]
    assert rows.numel() > 0 and rows.max() < 12
    assert out.shape == (24, 40, 3, 7)


def test_cuda_backend_refused_clearly_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailable, match="--backend cuda cannot be used"):
        resolve_backend("cuda")
    assert resolve_backend("auto") == "cpu"


def _parity_scene():
    """A bumpy closed surface (deformed sphere) of ~5k triangles, two views, 160x160."""
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=4)
    v = torch.tensor(sphere.vertices, dtype=torch.float32)
    bump = 1 + 0.15 * torch.sin(5 * v[:, 0]) * torch.cos(4 * v[:, 1])
    posed = v * bump[:, None] * torch.tensor([1.4, 0.8, 0.6])
    faces = torch.tensor(sphere.faces)
    views = torch.stack([translate(-4.0), translate(-5.0)])
    return v, torch.stack([posed, posed.flip(-1)]), faces, views


@pytest.mark.gpu
def test_cuda_and_cpu_backends_agree():
    canon, posed, faces, views = _parity_scene()
    cpu = render(canon, posed, faces, views, layers=4, backend="cpu", size=(160, 160))
    gpu = render(canon, posed, faces, views, layers=4, backend="cuda", size=(160, 160)).cpu()
    alpha_c, alpha_g = cpu[..., 6] > 0, gpu[..., 6] > 0
    # pixels away from silhouette edges: the layer-1 mask eroded by one pixel, and its complement eroded
    mask = alpha_c[..., 0].float()[:, None]
    inner = -torch.nn.functional.max_pool2d(-mask, 3, 1, 1)[:, 0] > 0
    outer = torch.nn.functional.max_pool2d(mask, 3, 1, 1)[:, 0] == 0
    away = (inner | outer)[..., None].expand_as(alpha_c)
    agree = (alpha_c == alpha_g)[away].float().mean()
    assert agree >= 0.995, f"coverage agreement {agree:.4f}"
    both = alpha_c & alpha_g & away
    size = (posed.amax(dim=(0, 1)) - posed.amin(dim=(0, 1))).max()
    diff = (cpu[..., :6] - gpu[..., :6]).abs().amax(-1)[both]
    assert diff.max() < 1e-3 * size, f"max point difference {diff.max():.2e}"


@pytest.mark.gpu
def test_cuda_range_mode_matches_instanced():
    canon, posed, faces, views = _parity_scene()
    inst = render(canon, posed, faces, views, backend="cuda")
    rng = render([canon, canon], list(posed), [faces, faces], views, backend="cuda")
    torch.testing.assert_close(inst, rng)


def test_empty_mesh_and_mesh_outside_the_view_give_zeros():
    empty_v, empty_f = torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)
    assert not render(empty_v, empty_v[None], empty_f, translate(-5.0)[None]).any()
    verts, faces = quad(50, 51, 50, 51, 0.0)
    assert not render(verts, verts[None], faces, translate(-5.0)[None]).any()


def test_render_layers_interpolates_extra_attributes_on_the_same_layers():
    verts, faces = box(1.0)
    attrs = torch.cat([verts, torch.full((8, 1), 7.0), verts[:, :1] * 3], dim=1)  # (V, 5)
    proj = projection_from_focal(torch.tensor([FOCAL]))
    out = render_layers(attrs, verts[None], faces, translate(-5.0)[None], proj, (H, W), 3, backend="cpu", workers=1)
    dpm = render(verts, verts[None], faces, translate(-5.0)[None])
    assert out.shape == (1, H, W, 3, 5 + 4)
    hit = out[..., -1] == 1
    torch.testing.assert_close(out[..., -1], dpm[..., 6], atol=0, rtol=0)
    torch.testing.assert_close(out[..., 3][hit], torch.full((int(hit.sum()),), 7.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., 4], 3 * out[..., 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., :3], dpm[..., :3], atol=0, rtol=0)


def test_pixel_rays_subset_matches_full_grid_and_hits_pixel_centres():
    from dualpm.camera import pixel_rays, project_points

    proj = projection_from_focal(torch.tensor(50.0), aspect=40 / 24)
    origins, dirs, lengths = pixel_rays(proj, 24, 40)
    assert origins.shape == (24, 40, 3) and lengths.shape == (24, 40)
    subset = torch.tensor([0, 39, 40 * 23, 517])
    o, d, n = pixel_rays(proj, 24, 40, subset)
    torch.testing.assert_close(o, origins.reshape(-1, 3)[subset], atol=0, rtol=0)
    torch.testing.assert_close(d, dirs.reshape(-1, 3)[subset], atol=0, rtol=0)
    torch.testing.assert_close(n, lengths.reshape(-1)[subset], atol=0, rtol=0)
    # a point along each ray projects back onto its pixel centre
    pix, w = project_points((origins + 3.0 * dirs).reshape(-1, 3), proj.double(), 24, 40)
    rows, cols = torch.meshgrid(torch.arange(24.0), torch.arange(40.0), indexing="ij")
    expected = torch.stack([cols.reshape(-1) + 0.5, rows.reshape(-1) + 0.5], dim=-1).double()
    torch.testing.assert_close(pix, expected, atol=1e-9, rtol=0)
    assert (w > 0).all()
