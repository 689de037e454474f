"""Data: folders, .npz, the embedded animals; dedupe before a seeded stratified split; clear errors; the
decode cache (a second load decodes nothing, any change to a file decodes again, damage is a miss)."""

import os
import time

import numpy as np
import pytest
from PIL import Image

from helpers import make_folder
from tandem.data import ANIMAL_CLASSES, load_dataset, split_dataset
from tandem.data.cache import cache_file
from tandem.errors import UserError


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Each test its own decode cache: none reads another's, none writes to ~/.cache."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


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


def test_npz_of_floats_or_channel_first_reads_like_uint8(tmp_path, small_npz):
    with np.load(small_npz) as arrays:
        x, y = arrays["x"], arrays["y"]
    reference = load_dataset(str(small_npz), 28, 1).pixels
    np.savez(tmp_path / "floats.npz", x=(x / 255.0).astype(np.float32), y=y)  # 0..1, as most pipelines hold them
    assert np.array_equal(load_dataset(str(tmp_path / "floats.npz"), 28, 1).pixels, reference)
    np.savez(tmp_path / "nchw.npz", x=x[:, None], y=y)
    assert np.array_equal(load_dataset(str(tmp_path / "nchw.npz"), 28, 1).pixels, reference)
    np.savez(tmp_path / "scaled.npz", x=x / 127.5 - 1, y=y)  # normalised values: refused, not guessed
    assert "float pixel values must lie in 0..1" in _error(tmp_path / "scaled.npz")


def test_second_load_of_a_folder_comes_from_the_cache_until_a_file_changes(tmp_path, cache_dir):
    root = make_folder(tmp_path / "data", per_class=8, rgb=True)  # 16 files: decoded by a pool of 2
    first = load_dataset(str(root), 32, 3, workers=2)
    assert first.decode == {**first.decode, "files": 16, "images": 16, "decoded": 16, "from_cache": False, "workers": 2}
    assert first.describe_decode().startswith("decoded 16 images in ") and "with 2 processes" in first.describe_decode()
    again = load_dataset(str(root), 32, 3)
    assert again.decode["decoded"] == 0 and again.decode["from_cache"]
    assert again.describe_decode().startswith("16 images from the decode cache in ")
    assert np.array_equal(again.pixels, first.pixels) and np.array_equal(again.labels, first.labels)
    assert again.classes == first.classes
    assert load_dataset(str(root), 32, 3, resize="pad").decode["decoded"] == 16  # other settings, other entry
    # Touched (same bytes, new mtime): decoded again.
    victim = root / "dog" / "003.jpg"
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert load_dataset(str(root), 32, 3).decode["decoded"] == 16
    # Replaced by another picture: decoded again, and the new pixels are the ones served.
    Image.new("RGB", (40, 33), (255, 0, 0)).save(victim)
    replaced = load_dataset(str(root), 32, 3)
    red = replaced.pixels[8 + 3].astype(int)  # dog/003.jpg, the 4th file of the 2nd class
    assert replaced.decode["decoded"] == 16 and red[..., 0].min() > 240 and red[..., 1:].max() < 15
    # A truncated cache file (a crash mid-write by another tool) is a miss, then rewritten.
    entry = cache_file(root, {"size": 32, "channels": 3, "resize": "crop", "skip_bad_files": False})
    assert entry.parent == cache_dir / "datasets"
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    assert load_dataset(str(root), 32, 3).decode["decoded"] == 16
    assert load_dataset(str(root), 32, 3).decode["from_cache"]


def test_unwritable_cache_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "data")
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "not-a-folder"))
    data = load_dataset(str(root), 28, 1)
    assert len(data) == 8 and data.decode["decoded"] == 8
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the decode cache" in err and "TANDEM_CACHE_DIR" in err


def test_skipped_files_are_cached_and_still_reported(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    assert load_dataset(str(root), 28, 1, skip_bad_files=True).decode["decoded"] == 8
    cached = load_dataset(str(root), 28, 1, skip_bad_files=True)
    assert cached.decode["from_cache"] and len(cached) == 8
    warning = f"skipped 1 unreadable image(s), first {root / 'cat' / 'broken.png'}"
    assert capsys.readouterr().err.count(warning) == 2  # once per load, from the cache too
    assert "data.skip_bad_files=true" in _error(root)  # without the setting: still an error, cache or not


def test_a_file_replaced_with_its_old_size_and_mtime_is_decoded_again(tmp_path):
    """`touch -r`, `cp -p`, `rsync -t`: the mtime can be set back; the ctime cannot, so the key holds it."""
    root = tmp_path / "data"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):  # BMP: the same width and height give the same byte size, whatever the picture
            Image.new("RGB", (40, 33), (20 * i, 40, 60)).save(root / name / f"{i}.bmp")
    first = load_dataset(str(root), 32, 3)
    assert first.decode["decoded"] == 6 and load_dataset(str(root), 32, 3).decode["from_cache"]
    victim = root / "dog" / "1.bmp"
    before = victim.stat()
    Image.new("RGB", (40, 33), (255, 0, 0)).save(victim)  # another picture, the same size
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))  # and its old mtime, as `touch -r` does
    while victim.stat().st_ctime_ns == before.st_ctime_ns:  # a coarse clock: wait until the ctime moves on
        time.sleep(0.01)
        os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = victim.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    replaced = load_dataset(str(root), 32, 3)
    assert replaced.decode["decoded"] == 6 and not replaced.decode["from_cache"]
    red = replaced.pixels[3 + 1].astype(int)  # dog/1.bmp, the 2nd file of the 2nd class
    assert red[..., 0].min() == 255 and red[..., 1:].max() == 0
    assert not np.array_equal(replaced.pixels[4], first.pixels[4])
