"""dualpm.images: decoding every common image flavour to float RGB, errors naming the file, resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dualpm.errors import DatasetError
from dualpm.images import image_array, load_image, open_image, resize_images, stack_images

def _png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_load_image_rgb_gray_rgba_16bit_palette(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(53, 37, 3), dtype=np.uint8)  # odd size, H != W
    out = load_image(_png(tmp_path / "rgb.png", rgb))
    assert out.shape == (3, 53, 37) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), rgb.astype(np.float32) / 255)

    gray = rng.integers(0, 256, size=(9, 11), dtype=np.uint8)
    out = load_image(_png(tmp_path / "gray.png", gray))
    assert out.shape == (3, 9, 11)
    for c in range(3):
        np.testing.assert_array_equal(out[c].numpy(), gray.astype(np.float32) / 255)

    rgba = rng.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    out = load_image(_png(tmp_path / "rgba.png", rgba))
    expected = rgba[..., :3].astype(np.float32) / 255 * (rgba[..., 3:].astype(np.float32) / 255)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-7)

    deep = rng.integers(0, 65536, size=(4, 7), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    out = load_image(tmp_path / "deep.png")
    np.testing.assert_allclose(out[1].numpy(), deep.astype(np.float32) / 65535, atol=1e-7)

    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "pal.png")
    expected = np.asarray(palette.convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_array_equal(load_image(tmp_path / "pal.png").permute(1, 2, 0).numpy(), expected)


def test_load_image_corrupt_truncated_missing(tmp_path):
    junk = np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()
    (tmp_path / "noise.png").write_bytes(junk)
    with pytest.raises(DatasetError, match="noise.png: cannot read image"):
        load_image(tmp_path / "noise.png")
    good = _png(tmp_path / "good.png", np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:300])
    with pytest.raises(DatasetError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(DatasetError, match="absent.png"):
        load_image(tmp_path / "absent.png")


def test_resize_and_stack():
    img = torch.full((2, 3, 37, 53), 0.25)
    out = resize_images(img, 16)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))  # constant images stay constant
    assert resize_images(img, (37, 53)) is img
    batch = stack_images([torch.rand(3, 20, 31), torch.rand(3, 7, 5)], 12)
    assert batch.shape == (2, 3, 12, 12)


def test_open_image_reads_bytes_and_expands_palettes(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    path = _png(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(image_array(open_image(path.read_bytes(), "stored rgb")), rgb)
    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "pal.png")
    # Palette indices are never handed out as values: the colours are.
    np.testing.assert_array_equal(image_array(open_image(tmp_path / "pal.png")), np.asarray(palette.convert("RGB")))
    with pytest.raises(DatasetError, match="sample 7: cannot read image"):
        open_image(b"\x89PNG nonsense", "sample 7")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied_to_images_and_masks(tmp_path, fmt):
    # Issue 22, item 8: a phone photo (pixels as the sensor saw them, EXIF orientation 6: turn 90 degrees
    # clockwise to view) was used sideways against its mask and point map.
    from dualpm.masks import read_mask

    stored = np.zeros((4, 6, 3), np.uint8)  # 4 rows x 6 columns as stored
    stored[0, :] = 255  # top row white
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.fromarray(stored).save(path, format=fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    upright = np.rot90(stored, k=-1)  # clockwise: 6 rows x 4 columns, the white row becomes the right column
    assert upright.shape == (6, 4, 3) and upright[:, -1].min() == 255 and upright[:, 0].max() == 0
    image = load_image(path)  # (3, H, W)
    assert tuple(image.shape) == (3, 6, 4)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), upright / 255.0, atol=0.05)
    np.testing.assert_array_equal(image_array(open_image(path.read_bytes())).shape, (6, 4, 3))
    mask_path = tmp_path / "mask.png"
    Image.fromarray(stored[..., 0]).save(mask_path, exif=exif.tobytes())
    np.testing.assert_array_equal(read_mask(mask_path), upright[..., 0] / 255.0)


def test_an_animated_gif_is_refused_naming_the_file(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    with pytest.raises(DatasetError, match=r"a.gif: an image of 3 frames \(animated, or several pages\); one still "
                       r"image is expected"):
        load_image(tmp_path / "a.gif")
    frames[0].save(tmp_path / "still.gif")
    assert tuple(load_image(tmp_path / "still.gif").shape) == (3, 8, 8)
