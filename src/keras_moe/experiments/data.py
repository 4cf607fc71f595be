"""Data sets of the experiments: CIFAR-10 (Keras or an image folder) and MNIST-1D.

An image folder has the usual layout, as a directory or a tar archive
(`.tar`, `.tar.gz`, `.tgz`), optionally under one top-level directory::

    train/<class>/*.jpg
    test/<class>/*.jpg

Class indices follow the sorted class names (for CIFAR-10 that is the data
set's own label order: airplane, automobile, bird, ...).
"""

import dataclasses
import io
import pathlib
import tarfile

import numpy as np

from keras_moe.experiments.common import ExperimentError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SPLITS = ("train", "test")


@dataclasses.dataclass
class ImageData:
    """Images as uint8 arrays `(n, height, width, 3)` and int labels `(n,)`."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple
    source: str

    def describe(self):
        return (
            f"{len(self.x_train)} training and {len(self.x_test)} test images "
            f"of shape {self.x_train.shape[1:]} in {len(self.class_names)} classes "
            f"({self.source})"
        )


def _list_folder(root):
    """`(relative path parts, reader)` for every file under a directory."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path.relative_to(root).parts, path.read_bytes


def _list_tar(archive):
    # Bytes are read in archive order: seeking back in a gzip stream re-reads it.
    for member in archive:
        if member.isfile():
            parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
            data = archive.extractfile(member).read()
            yield parts, (lambda data=data: data)


def _collect(entries, path):
    """Groups image files into `{split: {class: [(name, reader)]}}`."""
    files = [(parts, read) for parts, read in entries]
    images = [
        (parts, read)
        for parts, read in files
        if parts[-1].lower().endswith(IMAGE_SUFFIXES) and not parts[-1].startswith(".")
    ]
    if not images:
        raise ExperimentError(
            "`data` must be a folder or tar archive of images in the layout "
            "`train/<class>/*.jpg`, `test/<class>/*.jpg`. "
            f"Received: data={str(path)!r}, which holds no image files"
        )
    # A single top-level directory (such as `cifar10/`) is stripped.
    tops = {parts[0] for parts, _ in images}
    if len(tops) == 1 and tops != {"train"} and tops != {"test"}:
        images = [(parts[1:], read) for parts, read in images]
    grouped = {split: {} for split in SPLITS}
    for parts, read in images:
        if len(parts) != 3 or parts[0] not in SPLITS:
            raise ExperimentError(
                "`data` must hold images only as `train/<class>/<file>` and "
                "`test/<class>/<file>` (optionally under one top-level folder). "
                f"Received: data={str(path)!r} with an image at {'/'.join(parts)!r}"
            )
        split, class_name, name = parts
        grouped[split].setdefault(class_name, []).append((name, read))
    for split in SPLITS:
        if not grouped[split]:
            raise ExperimentError(
                f"`data` must have a `{split}/` folder with one sub-folder of "
                f"images per class. Received: data={str(path)!r} with no "
                f"`{split}/<class>/` images"
            )
    train_classes, test_classes = sorted(grouped["train"]), sorted(grouped["test"])
    if train_classes != test_classes:
        raise ExperimentError(
            "`data` must have the same classes under `train/` and `test/`. "
            f"Received: train classes {train_classes}, test classes {test_classes}"
        )
    return grouped, tuple(train_classes)


def _subset(n, size, rng):
    """Indices of a random subset of `size` out of `n` (all, in order, if None)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(rng.permutation(n)[:size])


def _decode(read, where):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(read())) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except OSError as error:
        raise ExperimentError(
            f"`data` holds a file that is not a readable image: {where!r} ({error})"
        ) from None


def _decode_split(grouped, split, class_names, size, rng, path):
    items = [
        (label, name, read)
        for label, class_name in enumerate(class_names)
        for name, read in sorted(grouped[split][class_name], key=lambda e: e[0])
    ]
    chosen = _subset(len(items), size, rng)
    images, labels = [], []
    for i in chosen:
        label, name, read = items[i]
        images.append(_decode(read, f"{split}/{class_names[label]}/{name}"))
        labels.append(label)
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise ExperimentError(
            "`data` must hold images of one size. "
            f"Received: data={str(path)!r} with image shapes {sorted(shapes)}"
        )
    return np.stack(images), np.asarray(labels, dtype="int32")


def load_image_folder(path, train_size=None, test_size=None, seed=0):
    """Reads an image-folder data set from a directory or a tar archive.

    Args:
        path: a directory, or a `.tar`/`.tar.gz`/`.tgz` archive, laid out as
            `train/<class>/*.jpg` and `test/<class>/*.jpg`, optionally under
            one top-level directory.
        train_size, test_size: if given, a random subset of that many images
            (drawn with `seed`, without replacement, in file order); all if None.
        seed: seed of the subsets.

    Returns:
        An `ImageData` with uint8 images `(n, height, width, 3)`, int32 labels
        (the index of the class in the sorted class names) and the class names.

    Raises:
        ExperimentError (a ValueError): if the path does not exist, is not
            laid out as above or holds a file that is not a readable image.
    """
    path = pathlib.Path(path)
    rng = np.random.default_rng(seed)
    if path.is_dir():
        grouped, class_names = _collect(_list_folder(path), path)
        train = _decode_split(grouped, "train", class_names, train_size, rng, path)
        test = _decode_split(grouped, "test", class_names, test_size, rng, path)
    elif path.is_file():
        try:
            archive = tarfile.open(path, "r:*")
        except tarfile.TarError:
            raise ExperimentError(
                "`data` must be a folder or a tar archive (.tar, .tar.gz, .tgz). "
                f"Received: data={str(path)!r}, which is neither"
            ) from None
        with archive:
            grouped, class_names = _collect(_list_tar(archive), path)
            train = _decode_split(grouped, "train", class_names, train_size, rng, path)
            test = _decode_split(grouped, "test", class_names, test_size, rng, path)
    else:
        raise ExperimentError(
            f"`data` must be an existing folder or tar archive. Received: data={str(path)!r}"
        )
    return ImageData(*train, *test, class_names=class_names, source=str(path))


def load_cifar10(data=None, train_size=None, test_size=None, seed=0):
    """CIFAR-10 from `keras.datasets.cifar10` (downloads once) or from `data`.

    Args:
        data: None for `keras.datasets.cifar10`, or a folder/tar archive in the
            image-folder layout (see `load_image_folder`), such as
            `../shared/data/cifar10-jpeg.tar.gz`.
        train_size, test_size: optional random subset sizes (seeded by `seed`).
        seed: seed of the subsets.

    Returns:
        An `ImageData`.
    """
    if data is not None:
        return load_image_folder(data, train_size, test_size, seed)
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # network, proxy, a truncated download, ...
        raise ExperimentError(
            "CIFAR-10 could not be downloaded by keras.datasets.cifar10 "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Without a network, pass `--data PATH`, a folder or .tar.gz of images "
            "laid out as train/<class>/*.jpg and test/<class>/*.jpg"
        ) from error
    rng = np.random.default_rng(seed)
    train = _subset(len(x_train), train_size, rng)
    test = _subset(len(x_test), test_size, rng)
    return ImageData(
        x_train[train],
        y_train.reshape(-1)[train].astype("int32"),
        x_test[test],
        y_test.reshape(-1)[test].astype("int32"),
        class_names=CIFAR10_CLASSES,
        source="keras.datasets.cifar10",
    )


def load_mnist1d(num_samples=None, seed=None):
    """MNIST-1D generated procedurally by `mnist1d.data.make_dataset` (no download).

    With the defaults this is the paper's data set: 4,000 training and 1,000
    test sequences of length 40 in 10 classes.

    Returns:
        `(x_train, y_train, x_test, y_test)` as float32 `(n, 40)` and int32 `(n,)`.
    """
    from mnist1d.data import get_dataset_args
    from mnist1d.data import make_dataset

    args = get_dataset_args()
    if num_samples is not None:
        args.num_samples = num_samples
    if seed is not None:
        args.seed = seed
    data = make_dataset(args)
    return (
        data["x"].astype("float32"),
        data["y"].astype("int32"),
        data["x_test"].astype("float32"),
        data["y_test"].astype("int32"),
    )
