import numpy as np
import pytest


def write_image_folder(
    root, classes=("cat", "dog", "frog"), n_train=4, n_test=2, size=8
):
    """Writes random JPEGs as `root/train/<class>/i.jpg`, `root/test/<class>/i.jpg`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for class_name in classes:
            folder = root / split / class_name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=95)
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "images")
