"""dualpm.masks: one decoder for every mask encoding, area resizing, IoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dualpm.errors import DatasetError
from dualpm.masks import MaskError, decode_mask, mask_iou, read_mask, resize_mask


def _object() -> np.ndarray:
    """(12, 10) bool: an L-shaped object, so a transposed or flipped decode would not pass."""
    inside = np.zeros((12, 10), bool)
    inside[2:9, 3:5] = True
    inside[7:9, 5:8] = True
    return inside


def _save(path, array, mode=None):
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    image.save(path)
    return path


def _encodings(tmp_path) -> dict[str, object]:
    """The same object mask in every encoding people save masks in (paths, or bytes)."""
    m = _object()
    u8 = m.astype(np.uint8)
    rgb_white = np.repeat((u8 * 255)[..., None], 3, axis=2)
    red = np.zeros(m.shape + (3,), np.uint8)
    red[..., 0] = u8 * 200  # a coloured mask on black: 0 and one other value
    cutout = np.full(m.shape + (4,), 255, np.uint8)  # white everywhere; the object is the alpha
    cutout[..., 3] = u8 * 255
    grey_alpha = np.stack([np.full(m.shape, 90, np.uint8), u8 * 255], axis=2)
    palette = Image.fromarray(u8, mode="L").convert("P")  # indices 0/1, palette black / near-black
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    return {
        "0/1 8-bit (published set)": _save(tmp_path / "01.png", u8, "L"),
        "0/255 8-bit": _save(tmp_path / "0255.png", u8 * 255, "L"),
        "1-bit": _save(tmp_path / "bit.png", m),
        "0/65535 16-bit": _save(tmp_path / "16.png", m.astype(np.uint16) * 65535),
        "0/1 16-bit": _save(tmp_path / "16_01.png", m.astype(np.uint16)),
        "RGB white on black": _save(tmp_path / "rgb.png", rgb_white),
        "RGB red on black": _save(tmp_path / "red.png", red),
        "RGBA cut-out": _save(tmp_path / "cutout.png", cutout),
        "grey + alpha": _save(tmp_path / "la.png", grey_alpha, "LA"),
        "palette": tmp_path / "palette.png",
        "JPEG-free bytes": (tmp_path / "01.png").read_bytes(),
    }


def test_every_encoding_decodes_to_the_same_mask(tmp_path):
    expected = _object().astype(np.float32)
    for name, source in _encodings(tmp_path).items():
        out = read_mask(source)
        assert out.dtype == np.float32 and out.shape == expected.shape, name
        np.testing.assert_array_equal(out, expected, err_msg=name)


def test_arrays_decode_by_value_not_dtype():
    m = _object()
    for array in (m, m.astype(np.uint8), m.astype(np.uint8) * 255, m.astype(np.uint16) * 300,
                  m.astype(np.int32) * 65535, m.astype(np.float32), m.astype(np.float64) * 0.7):
        np.testing.assert_array_equal(decode_mask(array, "x"), m.astype(np.float32), err_msg=str(array.dtype))
    # All inside, all outside.
    np.testing.assert_array_equal(decode_mask(np.full((3, 4), 7, np.uint8), "x"), np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(decode_mask(np.zeros((3, 4), np.uint16), "x"), np.zeros((3, 4), np.float32))


def test_soft_masks_keep_their_fractions(tmp_path):
    soft8 = np.array([[0, 1, 127, 128, 255]], np.uint8)
    np.testing.assert_allclose(read_mask(_save(tmp_path / "soft8.png", soft8, "L")), soft8 / 255.0, rtol=1e-6)
    soft16 = np.array([[0, 1000, 32767, 32768, 65535]], np.uint16)
    np.testing.assert_allclose(read_mask(_save(tmp_path / "soft16.png", soft16)), soft16 / 65535.0, rtol=1e-6)
    # 8-bit values in a 16-bit file (0..255 with edges) are an 8-bit soft mask.
    np.testing.assert_allclose(decode_mask(soft8.astype(np.uint16), "x"), soft8 / 255.0, rtol=1e-6)
    floats = np.array([[0.0, 0.25, 0.75, 1.0]], np.float32)
    np.testing.assert_array_equal(decode_mask(floats, "x"), floats)
    # Thresholding a soft mask: more than half inside.
    assert (read_mask(tmp_path / "soft8.png") > 0.5).tolist() == [[False, False, False, True, True]]


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array([[0, 37, 100, 200]], np.uint8), r"m.png: mask values are neither binary .* 4 levels from 0 to 200"),
        (np.array([[0, 3, 9000]], np.uint16), r"3 levels from 0 to 9000 \(uint16\)"),
        (np.array([[0.0, 0.5, 2.0]], np.float32), r"3 levels from 0.0 to 2.0"),
        (np.array([[0.0, np.nan]], np.float32), "NaN or infinite"),
        (np.array([[-1, 0, 1]], np.int32), "negative values"),
        (np.zeros((2, 2, 5), np.uint8), r"grey, grey\+alpha, RGB or RGBA image, got shape \(2, 2, 5\)"),
    ],
)
def test_uninterpretable_values_are_an_error_naming_the_file(array, message):
    with pytest.raises(MaskError, match=message):
        decode_mask(array, "m.png")


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetError, match="junk.png: cannot read image"):
        read_mask(tmp_path / "junk.png")
    with pytest.raises(DatasetError, match="absent.png"):
        read_mask(tmp_path / "absent.png")
    with pytest.raises(DatasetError, match="shard 3 sample 'a': cannot read image"):
        read_mask(b"nope", "shard 3 sample 'a'")
    soft = _save(tmp_path / "grey.png", np.array([[0, 50, 100]], np.uint8), "L")
    with pytest.raises(MaskError, match="grey.png: mask values"):
        read_mask(soft)


def test_resize_mask_by_area_then_more_than_half():
    mask = np.zeros((4, 4), np.float32)
    mask[0, 0:2] = 1  # top-left 2x2 block: 2 of 4 inside -> not more than half
    mask[0:2, 2:4] = 1  # top-right block: 4 of 4
    mask[2, 0:2] = 1
    mask[3, 0] = 1  # bottom-left block: 3 of 4
    out = resize_mask(mask, (2, 2))
    assert out.dtype == torch.float32
    assert out.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    batched = resize_mask(torch.from_numpy(np.stack([mask, 1 - mask])), (2, 2))
    assert batched.tolist() == [[[0.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]]
    same = resize_mask(mask > 0.5, (4, 4))  # bool, already the size: only thresholded
    assert torch.equal(same, torch.from_numpy(mask))


def test_mask_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True
    b[0, 1:] = True
    assert mask_iou(a, b) == pytest.approx(2 / 4)
    assert mask_iou(torch.from_numpy(a).float(), a) == 1.0
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2), bool)) == 1.0
