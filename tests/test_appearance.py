"""The rig's own look: glTF materials and textures read, sampled and rendered where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualpm.camera import projection_from_focal
from dualpm.errors import GltfError
from dualpm.gltf import load_skinned_mesh, save_skinned_mesh
from dualpm.gltf_material import load_surface, transformed_uv
from dualpm.render import render_layers
from dualpm.texture import CLAMP_TO_EDGE, MIRRORED_REPEAT, NEAREST, REPEAT, Texture, sample, srgb_to_linear
from pipeline.synth.asset_look import AssetLook, layer_albedo
from tests import reference_reader
from tests.rigs import SQUARES, checker, quad_rig

SIZE = 64
TEXELS = 4  # per checker square


def _render(path, size=SIZE):
    mesh = load_skinned_mesh(path)
    look = AssetLook.build(load_surface(path))
    verts = torch.tensor(mesh.vertices)
    attrs = torch.cat([verts, torch.zeros_like(verts), look.attributes], dim=1)
    view = torch.eye(4, dtype=torch.float64)
    view[2, 3] = -3.0  # camera on +Z at distance 3, looking at the quad
    proj = projection_from_focal(torch.tensor([50.0], dtype=torch.float64))
    layers = render_layers(attrs, verts[None], torch.tensor(mesh.faces), view[None], proj, size, 1,
                           backend="cpu", workers=1)[0, :, :, 0].numpy()
    hit = layers[..., -1] > 0
    albedo, _ = layer_albedo(look, None, layers, hit)
    xy = layers[..., -4:-2]  # camera-space x, y = world x, y of the quad (z = -3 in camera space)
    return albedo, hit, xy


def _expected(xy):
    """Square indices and the distance (in texels) of each point from its square's edges."""
    u, v = (xy[..., 0] + 1) / 2, (1 - xy[..., 1]) / 2
    col, row = np.floor(u * SQUARES).astype(int), np.floor(v * SQUARES).astype(int)
    fu, fv = u * SQUARES - col, v * SQUARES - row
    margin = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) * TEXELS
    return np.clip(row, 0, 7), np.clip(col, 0, 7), margin


def test_checker_squares_land_where_their_uvs_say(tmp_path):
    image = checker(TEXELS)
    albedo, hit, xy = _render(quad_rig(tmp_path / "quad.glb", image))
    row, col, margin = _expected(xy)
    inner = hit & (margin > 1.0)  # bilinear reads texels within 1 of the point: one colour there
    assert inner.sum() > 0.2 * hit.sum()  # the inner 2 x 2 of every 4 x 4 texel square
    want = srgb_to_linear(image[row * TEXELS, col * TEXELS] / 255.0)
    np.testing.assert_allclose(albedo[inner], want[inner], atol=1e-5)
    # near edges, the filtered colour stays between the two squares' colours (within the filter)
    edge = hit & (margin < 1.0)
    assert edge.any()


def test_texture_transform_and_wrap(tmp_path):
    image = checker(TEXELS)
    # KHR_texture_transform: uv' = offset + scale * uv, scale 2 -> the quad shows the checker twice per axis
    path = quad_rig(tmp_path / "quad.gltf", image, embed="data", transform={"offset": [0.25, 0.0], "scale": [2, 2]},
                    sampler={"wrapS": MIRRORED_REPEAT, "wrapT": REPEAT, "magFilter": NEAREST})
    surface = load_surface(path)
    ref = surface.materials[0].base_color_texture
    tex = surface.textures[0]
    assert (tex.wrap_s, tex.wrap_t, tex.mag_filter) == (MIRRORED_REPEAT, REPEAT, NEAREST)
    rot = load_surface(quad_rig(tmp_path / "r.gltf", image, embed="data", transform={"rotation": np.pi / 2,
                                                                                      "offset": [0, 1]}))
    turned = rot.materials[0].base_color_texture
    # u' = u cos r + v sin r, v' = v cos r - u sin r, then the offset: (0.3, 0.8) -> (0.8, -0.3 + 1)
    np.testing.assert_allclose(transformed_uv(turned, np.array([[[0.3, 0.8]]]))[0], [0.8, 0.7], atol=1e-12)
    uv = transformed_uv(ref, np.array([[[0.3, 0.8]]]))[0]
    np.testing.assert_allclose(uv, [0.25 + 0.6, 1.6])
    # hand-computed lookups: u' = 1.2 mirrors to 0.8 (column 6), v' = 1.6 repeats to 0.6 (row 4)
    got = sample(tex, np.array([[1.2 - 1e-3, 1.6 + 1e-3], [-0.3, 0.55]]))  # nearest: no blending
    lin = srgb_to_linear(image / 255.0)
    np.testing.assert_allclose(got[0, :3], lin[int(0.601 * 32), int(0.801 * 32)], atol=1e-6)
    np.testing.assert_allclose(got[1, :3], lin[int(0.55 * 32), int(0.3 * 32)], atol=1e-6)  # mirror of -0.3
    clamp = Texture.from_rgba(np.dstack([lin, np.ones((32, 32))]).astype(np.float32), (CLAMP_TO_EDGE,) * 2,
                              NEAREST)
    np.testing.assert_allclose(sample(clamp, np.array([[5.0, -2.0]]))[0, :3], lin[0, 31], atol=1e-6)


def test_minified_texture_averages_the_checker():
    """Footprint 32 texels on a 2-colour checker of 1-texel squares: the top mip level, the exact mean."""
    board = (np.indices((32, 32)).sum(0) % 2).astype(np.float32)
    tex = Texture.from_rgba(np.dstack([board] * 3 + [np.ones_like(board)]))
    got = sample(tex, np.random.default_rng(0).random((50, 2)), np.full(50, 32.0))
    np.testing.assert_allclose(got[:, :3], 0.5, atol=1e-6)
    aliased = sample(tex, np.random.default_rng(0).random((50, 2)))  # no footprint: level 0 flickers
    assert aliased[:, 0].std() > 0.1


def test_several_primitives_and_materials(tmp_path):
    image = checker(TEXELS)
    path = quad_rig(tmp_path / "quad.glb", image, primitives=2, factors=[[1, 1, 1, 1], [0.5, 0.25, 1.0, 1.0]])
    mesh = load_skinned_mesh(path)
    assert mesh.vertices.shape == (8, 3) and mesh.faces.shape == (4, 3) and mesh.faces.max() == 7
    surface = load_surface(path)
    assert surface.material.tolist() == [0] * 4 + [1] * 4
    albedo, hit, xy = _render(path)
    row, col, margin = _expected(xy)
    top = hit & (xy[..., 1] > 0.05) & (margin > 1.0)
    bottom = hit & (xy[..., 1] < -0.05)
    want = srgb_to_linear(image[row * TEXELS, col * TEXELS] / 255.0)
    np.testing.assert_allclose(albedo[top], want[top], atol=1e-5)
    np.testing.assert_allclose(albedo[bottom], np.broadcast_to([0.5, 0.25, 1.0], albedo[bottom].shape), atol=1e-6)


def test_several_primitives_become_one_the_reference_reader_loads(tmp_path):
    """The reference reader refuses a rig with 2 primitives; the shape synth writes from it has one."""
    path = quad_rig(tmp_path / "quad.gltf", checker(), embed="data", primitives=2)
    (tmp_path / "user" / "shapes" / "quad").mkdir(parents=True)
    (tmp_path / "user" / "shapes" / "quad" / "quad_shape.gltf").write_bytes(path.read_bytes())
    with pytest.raises(reference_reader.ReferenceRefusal, match="one primitive"):
        reference_reader.shapes(tmp_path / "user")
    mesh = load_skinned_mesh(path)
    (tmp_path / "data" / "shapes" / "quad").mkdir(parents=True)
    save_skinned_mesh(mesh, tmp_path / "data" / "shapes" / "quad" / "quad_shape.gltf")
    np.testing.assert_array_equal(reference_reader.shapes(tmp_path / "data")["quad"], mesh.vertices)


def test_embedded_and_external_textures_agree(tmp_path):
    image = checker(TEXELS)
    levels = []
    for name, embed in (("a.glb", "glb"), ("b.gltf", "data"), ("c.gltf", "file")):
        levels.append(load_surface(quad_rig(tmp_path / name, image, embed=embed)).textures[0].levels[0])
    np.testing.assert_array_equal(levels[0], levels[1])
    np.testing.assert_array_equal(levels[0], levels[2])
    np.testing.assert_allclose(levels[0][..., :3], srgb_to_linear(image / 255.0), atol=1e-6)


@pytest.mark.parametrize("uri", ["../outside.png", "/etc/passwd", "sub/../../x.png", "http://example.com/a.png"])
def test_texture_uri_escaping_the_folder_is_refused(tmp_path, uri):
    folder = tmp_path / "rig"
    folder.mkdir()
    (tmp_path / "outside.png").write_bytes(b"not read")
    path = quad_rig(folder / "quad.gltf", checker(), embed="file", uri=uri)
    load_skinned_mesh(path)  # the geometry does not need the image
    with pytest.raises(GltfError, match="image 0"):
        load_surface(path)


def test_alpha_mask_cut_pixels_are_not_opaque(tmp_path):
    rgba = np.dstack([checker(TEXELS), np.where(checker(TEXELS)[..., :1] < 128, 255, 0).astype(np.uint8)])
    path = quad_rig(tmp_path / "quad.glb", rgba, alpha_cutoff=0.5)
    mesh = load_skinned_mesh(path)
    look = AssetLook.build(load_surface(path))
    assert look.layers > 1
    verts = torch.tensor(mesh.vertices)
    attrs = torch.cat([verts, torch.zeros_like(verts), look.attributes], dim=1)
    view = torch.eye(4, dtype=torch.float64)
    view[2, 3] = -3.0
    proj = projection_from_focal(torch.tensor([50.0], dtype=torch.float64))
    layer = render_layers(attrs, verts[None], torch.tensor(mesh.faces), view[None], proj, SIZE, 1,
                          backend="cpu", workers=1)[0, :, :, 0].numpy()
    hit = layer[..., -1] > 0
    _, opaque = layer_albedo(look, None, layer, hit)
    row, _, margin = _expected(layer[..., -4:-2])
    inner = hit & (margin > 1.0)
    np.testing.assert_array_equal(opaque[inner], (32 * row + 16 < 128)[inner])
