import json

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


def usage_error(capsys, argv):
    """Runs `keras-moe argv`, which must stop with a usage error (exit code
    2), and returns what it wrote to stderr."""
    from keras_moe import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def quick_command(tmp_path, experiment, size):
    """The arguments of `keras-moe <experiment> --quick` on a new folder of
    random images of `size` x `size` pixels, and its output folder."""
    image_folder = write_image_folder(tmp_path / "images", size=size)
    out = tmp_path / "out"
    argv = [experiment, "--quick", "--data", str(image_folder), "--out", str(out)]
    return argv, out


def quick_results(tmp_path, experiment, size, options):
    """Runs `quick_command` with `options`: returns its output folder and its
    results, which name the experiment and the command."""
    from keras_moe import cli

    argv, out = quick_command(tmp_path, experiment, size)
    cli.main([*argv, *options])
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == experiment
    assert results["command"].startswith(f"keras-moe {experiment} --quick")
    return out, results


def small_images_error(tmp_path, capsys, experiment, size):
    """`keras-moe <experiment> --quick` on images of `size` x `size` pixels:
    a one-line usage error before any output is written. Returns it."""
    argv, out = quick_command(tmp_path, experiment, size)
    err = usage_error(capsys, argv)
    assert len(err.splitlines()) == 1
    assert not out.exists()
    return err
