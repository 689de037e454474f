"""Streamed image folders: the same split, the same pixels, the same batches as the in-memory path;
when to stream; a fingerprint that follows the data."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tandem.config import DataConfig
from tandem.data import Dataset, load_dataset, split_dataset
from tandem.data.sources import folder_settings
from tandem.data.stream import (
    FileDataset,
    digest_file,
    load_files,
    load_split_files,
    load_splits,
    should_stream,
    split_files,
)
from tandem.errors import UserError
from tandem.images import load_image
from tandem.train.loader import InMemoryBatches, StreamedBatches, make_batches

SIZE = 16


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_folder(root, classes=10, per_class=30, seed=0):
    """RGB 16x16 PNGs, two byte-identical copies of earlier files, and one file that is not an image."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i:03d}.png")
    shutil.copyfile(root / "class0" / "003.png", root / "class0" / "100.png")  # same class, later name
    shutil.copyfile(root / "class2" / "007.png", root / "class5" / "000b.png")  # another class: first one kept
    (root / "class4" / "012b.png").write_bytes(b"not a png")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "photos")


def data_cfg(root, **kw):
    return DataConfig(source=str(root), image_size=SIZE, channels=3, skip_bad_files=True, val_fraction=0.1,
                      test_fraction=0.2, **kw)


def test_streamed_splits_are_the_in_memory_splits(folder):
    cfg = data_cfg(folder)
    memory = split_dataset(load_dataset(str(folder), SIZE, 3, skip_bad_files=True), 0.1, 0.2, seed=3)
    files = load_split_files(cfg, seed=3)
    assert files.duplicates_removed == memory.duplicates_removed == 2
    for name in ("train", "val", "test"):
        streamed, held = getattr(files, name), getattr(memory, name)
        assert isinstance(streamed, FileDataset) and len(streamed) == len(held) > 0
        assert streamed.classes == held.classes and np.array_equal(streamed.labels, held.labels)
        pixels = np.stack([load_image(p, SIZE, 3) for p in streamed.paths])
        assert np.array_equal(pixels, held.pixels)  # the same files, in the same order
        assert np.array_equal(np.stack([streamed.read(i) for i in range(len(streamed))]), held.pixels)
    assert not any(p.endswith(("012b.png", "100.png", "000b.png")) for s in (files.train, files.val, files.test)
                   for p in s.paths)
    assert sum(map(len, (files.train, files.val, files.test))) == 10 * 30


def test_unreadable_file_without_skip_is_a_user_error(folder):
    with pytest.raises(UserError, match="data.skip_bad_files=true"):
        load_files(str(folder), SIZE, 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_in_memory_batches(folder, workers):
    cfg = data_cfg(folder)
    memory = split_dataset(load_dataset(str(folder), SIZE, 3, skip_bad_files=True), 0.1, 0.2, seed=0).train
    files = load_split_files(cfg, seed=0).train
    held = InMemoryBatches(memory, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    with StreamedBatches(files, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], workers=workers, batch_size=32) as streamed:
        assert len(streamed) == len(held) and torch.equal(streamed.labels, held.labels)
        order = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))
        for epoch_batches in (list(order.split(32)), list(order.split(32))[3:], [order[:5], order[:0], order[5:9]]):
            got = list(streamed.batches(epoch_batches))  # one DataLoader serves every call
            want = list(held.batches(epoch_batches))
            assert len(got) == len(want) == len(epoch_batches)
            for (x, y), (x_ref, y_ref), index in zip(got, want, epoch_batches):
                assert x.dtype == torch.float32 and x.shape == (len(index), 3, SIZE, SIZE)
                assert torch.equal(x, x_ref) and torch.equal(y, y_ref) and torch.equal(y, held.labels[index])


def test_make_batches_picks_by_the_split_type(folder):
    from tandem.config import TrainConfig

    cfg = TrainConfig(data=data_cfg(folder, workers=0))
    assert isinstance(make_batches(load_split_files(cfg.data, 0).val, cfg, "cpu"), StreamedBatches)
    memory = split_dataset(load_dataset(str(folder), SIZE, 3, skip_bad_files=True), 0.1, 0.2, 0)
    assert isinstance(make_batches(memory.val, cfg, "cpu"), InMemoryBatches)
    assert isinstance(load_splits(data_cfg(folder, stream="on"), 0).train, FileDataset)
    assert isinstance(load_splits(data_cfg(folder, stream="off"), 0).train, Dataset)


def test_a_file_changed_while_training_is_a_user_error(folder):
    files = load_split_files(data_cfg(folder), seed=0).train
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(files.paths[1])
    source = StreamedBatches(files, 0.5, 0.5, workers=0)
    with pytest.raises(UserError, match="changed while training"):
        list(source.batches([torch.arange(4)]))


def test_should_stream(folder, tmp_path, monkeypatch):
    assert should_stream(str(folder), SIZE, 3, "on") is True
    assert should_stream(str(folder), SIZE, 3, "off") is False
    assert should_stream("animals", 28, 1, "auto") is False
    assert should_stream(str(folder), SIZE, 3, "auto") is False  # 303 small files: in memory
    monkeypatch.setattr("tandem.data.stream.available_memory", lambda: 4 * 303 * SIZE * SIZE * 3 * 5 - 1)
    assert should_stream(str(folder), SIZE, 3, "auto") is True
    monkeypatch.setattr("tandem.data.stream.available_memory", lambda: 4 * 303 * SIZE * SIZE * 3 * 5)
    assert should_stream(str(folder), SIZE, 3, "auto") is False
    np.savez(tmp_path / "arrays.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4))
    for source, what in (("animals", "the embedded animals"), (str(tmp_path / "arrays.npz"), "a file"),
                         (str(tmp_path / "nowhere"), "does not exist")):
        assert should_stream(source, 28, 1, "off") is False
        with pytest.raises(UserError) as err:
            should_stream(source, 28, 1, "on")
        message = str(err.value)
        assert "\n" not in message and "streams image folders only" in message and what in message
        assert "data.stream=auto" in message


def test_fingerprint_is_stable_and_follows_the_files(folder):
    first = load_files(str(folder), SIZE, 3, skip_bad_files=True)
    again = load_files(str(folder), SIZE, 3, skip_bad_files=True)
    assert not first.decode["from_cache"] and again.decode["from_cache"]  # digests from the cache
    assert "from the cache" in again.describe_decode() and "hashed 303" in first.describe_decode()
    assert first.fingerprint() == again.fingerprint()
    assert split_files(first, 0.1, 0.2, 0).train.fingerprint() == split_files(again, 0.1, 0.2, 0).train.fingerprint()
    path = folder / "class3" / "004.png"
    Image.new("RGB", (SIZE, SIZE), (9, 9, 9)).save(path)
    os.utime(path, ns=(1, 1))  # even with an old mtime: the ctime changed, so it is hashed again
    changed = load_files(str(folder), SIZE, 3, skip_bad_files=True)
    assert not changed.decode["from_cache"] and changed.fingerprint() != first.fingerprint()
    digest_file(folder, folder_settings(SIZE, 3, "crop", True)).write_bytes(b"damaged")  # a miss, not an error
    rehashed = load_files(str(folder), SIZE, 3, skip_bad_files=True)
    assert not rehashed.decode["from_cache"] and rehashed.fingerprint() == changed.fingerprint()


def test_stream_module_imports_no_torch(folder):
    import subprocess
    import sys

    code = ("import sys\nfrom tandem.data.stream import load_split_files, should_stream\n"
            f"should_stream({str(folder)!r}, 16, 3, 'auto')\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.slow
def test_training_streamed_equals_training_in_memory(folder, tmp_path):
    """The whole loop on the same folder and seed, data.stream=on (2 workers) vs off: the same weights, bitwise,
    and the same figures; export reads a streamed run's test split too."""
    from safetensors.torch import load_file

    from tandem.config import TrainConfig
    from tandem.export.onnx_bundle import export_bundle
    from tandem.train.loop import train

    results = {}
    for stream in ("on", "off"):
        cfg = TrainConfig.model_validate({
            "data": {"source": str(folder), "image_size": SIZE, "channels": 3, "skip_bad_files": True,
                     "stream": stream, "workers": 2},
            "model": {"name": "cnn", "width": 4}, "batch_size": 32, "epochs": 2, "precision": "fp32",
            "progress": False, "out_dir": str(tmp_path / stream)})
        results[stream] = train(cfg, log=lambda *a, **k: None)
    streamed, in_memory = results["on"], results["off"]
    a = load_file(str(streamed.last_checkpoint / "model.safetensors"))
    b = load_file(str(in_memory.last_checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed.metrics["test_accuracy"] == in_memory.metrics["test_accuracy"]
    assert streamed.metrics["decode"]["streamed"] is True
    from tandem.bundle import read_manifest

    bundle = export_bundle(streamed.run_dir, tmp_path / "bundle", log=lambda *a, **k: None)
    assert read_manifest(bundle)["metrics"]["test_images"] == in_memory.metrics["test_images"]


@pytest.mark.slow
def test_resume_names_a_changed_stream_mode(folder, tmp_path):
    """The two modes fingerprint the same images differently: a resume across them says what to set."""
    from helpers import run_tandem

    out = tmp_path / "run"
    settings = [f"data.source={folder}", f"data.image_size={SIZE}", "data.channels=3", "data.skip_bad_files=true",
                "data.workers=0", "model.width=4", "max_steps=2", "precision=fp32", f"out_dir={out}"]
    run_tandem("train", *settings, "data.stream=on", check=True)
    refused = run_tandem("train", "--resume", str(out), "data.stream=off")
    assert refused.returncode == 2
    assert "the run streamed its folder" in refused.stderr and "data.stream=on" in refused.stderr
