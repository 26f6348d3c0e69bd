import numpy as np
import torch
from PIL import Image

from diffrestore.evaluation.data import center_crop_resize, choose_subset, find_images, load_eval_image


def test_find_images_recursive_sorted(tmp_path):
    for rel in ["b/x.JPEG", "a/y.png", "z.jpg", "notes.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".txt":
            p.write_text("x")
        else:
            Image.new("RGB", (4, 4)).save(p, format="PNG")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["a/y.png", "b/x.JPEG", "z.jpg"]


def test_subset_is_seeded_and_order_stable():
    files = [f"f{i}" for i in range(50)]
    a, b, c = choose_subset(files, 10, 0), choose_subset(files, 10, 0), choose_subset(files, 10, 1)
    assert a == b and a != c and a == sorted(a, key=files.index) and len(set(a)) == 10
    assert choose_subset(files, None, 0) == files


def test_first_subset_is_the_sorted_head():
    files = [f"f{i:02d}" for i in range(50)]
    assert choose_subset(files, 7, 3, first=True) == files[:7]
    assert choose_subset(files, 70, 3, first=True) == files


def test_center_crop_takes_the_middle_square():
    a = np.zeros((10, 30, 3), np.uint8)
    a[:, 10:20] = 255  # the central 10x10 square is white
    out = center_crop_resize(Image.fromarray(a), 10)
    assert out.size == (10, 10) and np.asarray(out).min() == 255


def test_load_eval_image_real_photo(shared):
    path = sorted((shared / "data" / "imagenet-sample-500").glob("*.JPEG"))[0]
    x = load_eval_image(path, 256)
    assert x.shape == (3, 256, 256) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1 and x.std() > 0.05
