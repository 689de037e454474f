"""Data: folders, .npz, the embedded animals; dedupe before a seeded stratified split; clear errors."""

import numpy as np
import pytest
from PIL import Image

from conftest import animals
from tandem.data import ANIMAL_CLASSES, load_dataset, split_dataset
from tandem.errors import UserError


def make_folder(root, per_class=4, classes=("cat", "dog"), rgb=False):
    x, y = animals(per_class, classes=len(classes))
    for image, label in zip(x, y):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image).resize((40, 33))  # any size: resized on load
        if rgb:
            picture = picture.convert("RGB")
        picture.save(folder / f"{len(list(folder.iterdir())):03d}.{'jpg' if rgb else 'png'}")
    return root


def test_embedded_animals_split_is_deduplicated_stratified_and_seeded():
    data = load_dataset("animals", 28, 1)
    assert data.pixels.shape == (10000, 28, 28, 1) and data.classes == ANIMAL_CLASSES
    splits = split_dataset(data, 0.1, 0.1, seed=0)
    assert splits.duplicates_removed == 284  # the data set's README: 9,716 distinct images
    parts = [splits.train, splits.val, splits.test]
    assert sum(len(p) for p in parts) == 9716
    # No image (byte for byte) on two sides of the split.
    keys = [{p.tobytes() for p in part.pixels} for part in parts]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    # Stratified: each class is 10% of its own distinct images in test (birds have many duplicates).
    distinct = sum(np.bincount(part.labels, minlength=10) for part in parts)
    assert list(np.bincount(splits.test.labels, minlength=10)) == [round(n * 0.1) for n in distinct]
    again = split_dataset(data, 0.1, 0.1, seed=0)
    assert np.array_equal(again.test.pixels, splits.test.pixels)
    other = split_dataset(data, 0.1, 0.1, seed=1)
    assert not np.array_equal(other.test.pixels, splits.test.pixels)


def test_folder_of_any_size_gray_or_rgb(tmp_path):
    make_folder(tmp_path / "gray")
    gray = load_dataset(str(tmp_path / "gray"), 28, 1)
    assert gray.classes == ["cat", "dog"] and gray.pixels.shape == (8, 28, 28, 1)
    make_folder(tmp_path / "rgb", rgb=True)
    rgb = load_dataset(str(tmp_path / "rgb"), 32, 3)
    assert rgb.pixels.shape == (8, 32, 32, 3) and rgb.pixels.dtype == np.uint8
    assert list(rgb.labels) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_npz(small_npz):
    data = load_dataset(str(small_npz), 28, 1)
    assert len(data) == 600 and data.classes == ANIMAL_CLASSES


def _error(source, **kw) -> str:
    with pytest.raises(UserError) as err:
        load_dataset(str(source), 28, 1, **kw)
    return str(err.value)


def test_folder_errors(tmp_path):
    assert "does not exist" in _error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no class sub-folders" in _error(tmp_path / "empty")
    make_folder(tmp_path / "hollow")
    (tmp_path / "hollow" / "zebra").mkdir()
    assert "class 'zebra'" in _error(tmp_path / "hollow") and "has no images" in _error(tmp_path / "hollow")
    make_folder(tmp_path / "one", classes=("cat",))
    assert "only one class ('cat')" in _error(tmp_path / "one")


def test_unreadable_image_is_named_or_skipped(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    message = _error(root)
    assert str(root / "cat" / "broken.png") in message and "data.skip_bad_files=true" in message
    data = load_dataset(str(root), 28, 1, skip_bad_files=True)
    assert len(data) == 8
    assert "skipped 1 unreadable image" in capsys.readouterr().err


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 8, 8), np.uint8))
    assert "must hold arrays 'x'" in _error(tmp_path / "bad.npz")
    np.savez(tmp_path / "one.npz", x=np.arange(4 * 64, dtype=np.uint8).reshape(4, 8, 8), y=np.zeros(4, np.int64))
    with pytest.raises(UserError, match="at least two"):
        split_dataset(load_dataset(str(tmp_path / "one.npz"), 8, 1), 0.1, 0.2, 0)
