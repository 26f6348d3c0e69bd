import numpy as np
import pytest
import torch
from PIL import Image

from diffrestore import image_io


def test_uint8_roundtrip_is_exact(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    x = image_io.uint8_to_tensor(a)
    assert x.shape == (3, 7, 9) and x.min() >= -1 and x.max() <= 1
    image_io.write_image(tmp_path / "a.png", x)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), a)
    assert torch.equal(image_io.read_image(tmp_path / "a.png"), x)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_modes_convert_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.full((4, 5, 3), 128, np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.full((4, 5), 128 * 257, np.uint16))
        path = tmp_path / "a.png"
    else:
        img = rgb.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else rgb.convert(mode)
        path = tmp_path / ("a.tif" if mode == "CMYK" else "a.png")
    img.save(path)
    x = image_io.read_image(path)
    assert x.shape == (3, 4, 5)
    # mid-grey stays mid-grey whatever the storage mode (CMYK conversion is lossy by a few levels)
    assert torch.allclose(x, torch.full_like(x, 128 / 127.5 - 1), atol=0.05 if mode == "CMYK" else 1e-6)


def test_transparent_pixels_composite_on_white(tmp_path):
    a = np.zeros((2, 2, 4), np.uint8)  # fully transparent black
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    assert torch.allclose(image_io.read_image(tmp_path / "t.png"), torch.ones(3, 2, 2))


def test_unreadable_files_raise_one_line_errors(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    for p in [tmp_path / "bad.png", tmp_path / "missing.png", tmp_path]:
        with pytest.raises(image_io.ImageReadError) as e:
            image_io.read_image(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with image_io.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    image_io.atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n' and len(list(tmp_path.iterdir())) == 1


def test_written_files_get_normal_permissions(tmp_path):
    image_io.atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~image_io._UMASK
