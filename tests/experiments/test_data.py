import tarfile

import numpy as np
import pytest

from keras_moe.experiments import data
from tests.experiments.conftest import write_image_folder


def test_folder_shapes_labels_and_classes(image_folder):
    images = data.load_image_folder(image_folder)
    assert images.class_names == ("cat", "dog", "frog")
    assert images.x_train.shape == (12, 8, 8, 3)
    assert images.x_test.shape == (6, 8, 8, 3)
    assert images.x_train.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(images.y_train), [4, 4, 4])
    np.testing.assert_array_equal(np.bincount(images.y_test), [2, 2, 2])


def test_pixels_match_the_files(image_folder):
    from PIL import Image

    images = data.load_image_folder(image_folder)
    expected = np.asarray(Image.open(image_folder / "train" / "dog" / "0000.jpg"))
    # Files are read sorted by class, then name: dog/0000.jpg is the fifth.
    np.testing.assert_array_equal(images.x_train[4], expected)
    assert images.y_train[4] == 1


def test_tar_gz_with_a_top_level_folder_equals_the_folder(tmp_path, image_folder):
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_folder, arcname="mydata")
    from_tar = data.load_image_folder(archive)
    from_folder = data.load_image_folder(image_folder)
    np.testing.assert_array_equal(from_tar.x_train, from_folder.x_train)
    np.testing.assert_array_equal(from_tar.y_test, from_folder.y_test)
    assert from_tar.class_names == from_folder.class_names


def test_subsets_are_seeded_and_sized(image_folder):
    a = data.load_cifar10(image_folder, train_size=5, test_size=3, seed=1)
    b = data.load_cifar10(image_folder, train_size=5, test_size=3, seed=1)
    assert a.x_train.shape[0] == 5 and a.x_test.shape[0] == 3
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_train, b.y_train)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train/cat/a.jpg"}, "`test/` folder"),
        ({"test/cat/a.jpg"}, "`train/` folder"),
        ({"train/cat/a.jpg", "test/dog/a.jpg"}, "same classes"),
        ({"train/a.jpg", "test/cat/a.jpg"}, "train/<class>/<file>"),
        ({"train/cat/x/a.jpg", "test/cat/a.jpg"}, "train/<class>/<file>"),
        (set(), "no image files"),
    ],
)
def test_malformed_folders(tmp_path, layout, message):
    from PIL import Image

    root = tmp_path / "bad"
    root.mkdir()
    (root / "README.txt").write_text("not an image")
    for relative in layout:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / relative)
    with pytest.raises(ValueError, match=message):
        data.load_image_folder(root)


def test_missing_path_and_non_archive(tmp_path):
    with pytest.raises(ValueError, match="existing folder"):
        data.load_image_folder(tmp_path / "absent")
    not_tar = tmp_path / "x.tar.gz"
    not_tar.write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="tar archive"):
        data.load_image_folder(not_tar)


def test_images_of_different_sizes(tmp_path):
    root = write_image_folder(tmp_path / "a", classes=("cat",), n_train=1, n_test=1)
    from PIL import Image

    Image.new("RGB", (5, 5)).save(root / "train" / "cat" / "big.jpg")
    with pytest.raises(ValueError, match="one size"):
        data.load_image_folder(root)


def test_mnist1d_is_generated_with_the_paper_sizes():
    x_train, y_train, x_test, y_test = data.load_mnist1d()
    assert x_train.shape == (4000, 40) and x_test.shape == (1000, 40)
    assert set(np.unique(y_train)) == set(range(10))
