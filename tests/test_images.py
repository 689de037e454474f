"""Images are read as what they are, never guessed: value ranges, channel order, 16-bit PNGs, EXIF
orientation, non-square shapes; JPEG draft decoding agrees with a full decode; files decode in a pool, in
order, past bad files. Each case was a silently wrong read before tandem.images."""

import multiprocessing
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tandem.errors import UserError
from tandem.images import batch_pixels, decode_files, fit_pil, load_image, to_pixels
from tandem.images.pixels import _draft


def _message(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_float_arrays_are_0_to_1_and_anything_else_is_refused():
    image = np.random.default_rng(0).random((28, 28))  # what plt.imread and scikit-image give
    expected = np.rint(image * 255).astype(np.uint8)
    assert np.array_equal(to_pixels(image, 28, 1)[0, ..., 0], expected)
    assert np.array_equal(to_pixels(image.astype(np.float32)[None, ..., None], 28, 1)[0, ..., 0], expected)
    for bad in (image * 255, image - 0.5, np.full((28, 28), np.nan)):
        message = _message(lambda: to_pixels(bad, 28, 1))
        assert "0..1" in message and "uint8 0..255" in message


def test_integer_arrays_uint16_is_sixteen_bit_others_must_be_0_to_255():
    ramp = np.linspace(0, 65535, 28 * 28).astype(np.uint16).reshape(28, 28)
    assert np.array_equal(to_pixels(ramp, 28, 1)[0, ..., 0], np.rint(ramp / 257).astype(np.uint8))
    small = np.arange(28 * 28).reshape(28, 28) % 256
    assert np.array_equal(to_pixels(small.astype(np.int64), 28, 1), to_pixels(small.astype(np.uint8), 28, 1))
    assert "0..255" in _message(lambda: to_pixels(small.astype(np.int16) - 1, 28, 1))
    assert "0..255" in _message(lambda: to_pixels(small.astype(np.int32) + 1, 28, 1))
    assert "boolean" in _message(lambda: to_pixels(small > 9, 28, 1))


def test_channel_first_batches_are_transposed_and_one_ambiguous_image_is_refused():
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    assert np.array_equal(to_pixels(nchw, 28, 3), to_pixels(nhwc, 28, 3))
    # (3, H, W): one channel-first colour image, or three grey images? Refused, saying how to tell.
    message = _message(lambda: to_pixels(nchw[0], 28, 3))
    assert "np.moveaxis(a, 0, -1)" in message and "a[..., None]" in message
    assert np.array_equal(to_pixels(nchw[0][None], 28, 3), to_pixels(nhwc[:1], 28, 3))  # a batch of one: clear
    assert np.array_equal(to_pixels(nchw[0, :1], 28, 1), nhwc[:1, :, :, :1])  # (1, H, W): one grey image either way
    assert np.array_equal(to_pixels([nchw[0]], 28, 3), nhwc[:1])  # a list item is one image: clear


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (256, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    pixels = load_image(tmp_path / "deep.png", 256, 1)[..., 0]
    assert np.array_equal(pixels, np.rint(ramp / 257).astype(np.uint8))
    assert (pixels == 255).mean() < 0.01  # clipping saturated 99.6% of them


@pytest.mark.parametrize("orientation, stored_as", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)])
def test_exif_orientation_is_applied(tmp_path, orientation, stored_as):
    upright = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = orientation  # "rotate to view": how phones store a photo taken sideways
    upright.transpose(stored_as).save(tmp_path / "sideways.png", exif=exif)
    for resize in ("squash", "pad"):
        expected = load_image(tmp_path / "upright.png", 40, 3, resize)
        assert np.array_equal(load_image(tmp_path / "sideways.png", 40, 3, resize), expected)
        with Image.open(tmp_path / "sideways.png") as image:  # a PIL image the caller opened: the same
            assert np.array_equal(to_pixels(image, 40, 3, resize)[0], expected)
    # A JPEG (drafted, then turned): the bright corner of the upright picture stays where it was.
    photo = np.zeros((600, 800), np.uint8)
    photo[:200, :300] = 255
    Image.fromarray(photo).save(tmp_path / "upright.jpg")
    Image.fromarray(photo).transpose(stored_as).save(tmp_path / "sideways.jpg", exif=exif)
    expected = load_image(tmp_path / "upright.jpg", 28, 1, "squash").astype(int)
    assert np.abs(load_image(tmp_path / "sideways.jpg", 28, 1, "squash") - expected).max() <= 2  # measured: 0


def test_resize_modes_on_a_wide_image_alike_for_files_pil_and_arrays(tmp_path):
    wide = np.zeros((30, 60), np.uint8)
    wide[:, :6] = 255  # a white bar on the left edge
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = {}
    for resize in ("squash", "crop", "pad"):
        forms = to_pixels([tmp_path / "wide.png", Image.fromarray(wide), wide], 30, 1, resize)[..., 0]
        assert np.array_equal(forms[0], forms[1]) and np.array_equal(forms[0], forms[2])
        out[resize] = forms[0]
    assert out["crop"].max() == 0  # the centre square: the bar is cut away
    assert out["squash"][:, 0].min() > 200 and out["squash"][:, -1].max() == 0  # stretched, bar full height
    assert out["pad"][:7].max() == 0 and out["pad"][-7:].max() == 0  # black bands above and below...
    assert out["pad"][9:21, 0].min() > 200  # ...and the whole picture, bar included, between them


@pytest.mark.parametrize("channels", [1, 3])
def test_draft_decode_of_a_large_jpeg_agrees_with_a_full_decode(tmp_path, channels):
    yy, xx = np.mgrid[0:1800, 0:2400]
    picture = np.stack([xx * 255 // 2400, yy * 255 // 1800, 128 + 100 * np.sin(xx / 90.0) * np.cos(yy / 70.0)], -1)
    Image.fromarray(picture.astype(np.uint8)).save(tmp_path / "big.jpg", quality=90)
    with Image.open(tmp_path / "big.jpg") as image:
        _draft(image, 64, channels, "crop")
        assert image.size == (300, 225)  # decoded at 1/8 scale: still >= 2x the 64 pixels crop needs
    for resize in ("crop", "pad"):
        with Image.open(tmp_path / "big.jpg") as image:
            image.load()
            full = fit_pil(image, 64, channels, resize).astype(int)
        fast = load_image(tmp_path / "big.jpg", 64, channels, resize)
        assert np.abs(fast - full).mean() < 0.5 and np.abs(fast - full).max() <= 2  # measured: 0.14 and 1


def _folder_of_files(tmp_path, n=20, bad=(5, 12)):
    rng = np.random.default_rng(3)
    files = []
    for i in range(n):
        path = tmp_path / f"{i:02d}.png"
        if i in bad:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (20 + i, 30), dtype=np.uint8)).save(path)
        files.append(path)
    return files


def test_decode_files_in_a_pool_keeps_input_order_and_reports_bad_files(tmp_path):
    files = _folder_of_files(tmp_path)
    pooled = list(decode_files(files, 28, 1, workers=2))  # 20 files >= 16: two worker processes
    serial = list(decode_files(files, 28, 1, workers=1))
    assert [path for path, _, _ in pooled] == files
    for (path, pixels, error), (_, serial_pixels, serial_error) in zip(pooled, serial):
        if path.name in ("05.png", "12.png"):
            assert pixels is None and str(path) in error and "fix or remove the file" in error
            assert serial_error == error
        else:
            assert error is None and np.array_equal(pixels, load_image(path, 28, 1))
            assert np.array_equal(pixels, serial_pixels)
    assert not multiprocessing.active_children()  # the pool is gone once the files are done


def test_decode_files_stops_its_pool_when_closed_early(tmp_path):
    files = _folder_of_files(tmp_path, n=40, bad=())
    stream = decode_files(files, 28, 1, workers=2)
    assert next(stream)[0] == files[0]
    stream.close()
    assert not multiprocessing.active_children()


# Grey + alpha, empty input, folders, a broken pool: each was a wrong read or a wrong message before.

def _grey_alpha(height=20, width=30) -> np.ndarray:
    """An "LA" picture (H, W, 2): grey values, and alpha from opaque to clear, so the flattening shows."""
    rng = np.random.default_rng(4)
    la = rng.integers(0, 256, (height, width, 2), dtype=np.uint8)
    la[..., 1] = np.linspace(0, 255, width).round().astype(np.uint8)
    return la


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [20, 28])
def test_a_grey_alpha_array_reads_like_the_same_la_png(tmp_path, channels, size):
    Image.fromarray(_grey_alpha(), "LA").save(tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as image:
        assert image.mode == "LA"
        array = np.asarray(image)  # (20, 30, 2): what a user holds after np.asarray(Image.open(...))
    expected = load_image(tmp_path / "la.png", size, channels)
    assert array.shape == (20, 30, 2)
    assert np.array_equal(to_pixels(array, size, channels), expected[None])  # one image, not 20 of 30x2
    assert np.array_equal(to_pixels([array, array.transpose(2, 0, 1)], size, channels), np.stack([expected] * 2))
    assert np.array_equal(to_pixels(np.stack([array] * 3), size, channels), np.stack([expected] * 3))  # (N, H, W, 2)
    nchw = np.stack([array] * 3).transpose(0, 3, 1, 2)  # (N, 2, H, W)
    assert np.array_equal(to_pixels(nchw, size, channels), np.stack([expected] * 3))
    # Flattened onto black: a clear pixel is black, an opaque one keeps its grey.
    clear, opaque = np.full((size, size, 2), 200, np.uint8), np.full((size, size, 2), 200, np.uint8)
    clear[..., 1], opaque[..., 1] = 0, 255
    assert to_pixels(clear, size, channels).max() == 0 and (to_pixels(opaque, size, channels) == 200).all()
    # (2, H, W) alone: one channel-first grey + alpha image, or two grey images? Refused, as for 3 and 4.
    message = _message(lambda: to_pixels(array.transpose(2, 0, 1), size, channels))
    assert "either one channel-first image or 2 grey images" in message and "np.moveaxis(a, 0, -1)" in message


@pytest.mark.parametrize("empty", [np.zeros((0, 28, 28, 3), np.uint8), np.zeros((0, 28, 28), np.uint8),
                                   np.zeros((0, 3, 28, 28), np.float32), np.zeros((0, 40, 40, 3), np.uint8), []])
def test_an_empty_batch_is_no_images_given(empty):
    assert _message(lambda: to_pixels(empty, 28, 3)) == "no images given"
    if isinstance(empty, np.ndarray):
        assert _message(lambda: batch_pixels(empty, 28, 3)) == "no images given"


def test_an_image_without_pixels_is_refused_not_made_black():
    for empty in (np.zeros((0, 28), np.uint8), [np.zeros((28, 0, 3), np.uint8)], np.zeros((2, 0, 28, 3), np.uint8)):
        assert "has no pixels" in _message(lambda: to_pixels(empty, 28, 3))


def test_a_folder_where_an_image_file_belongs_says_so(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for call in (lambda: load_image(photos, 28, 1), lambda: to_pixels([photos], 28, 1), lambda: to_pixels(str(photos), 28, 1)):
        message = _message(call)
        assert message.startswith(f"{photos} is a folder, not an image file") and "predict_files" in message
        assert "tandem predict" in message and "fix or remove" not in message


def test_a_pool_broken_by_a_script_on_standard_input_names_that_cause(tmp_path):
    for i in range(16):  # POOL_MIN_FILES: enough for a pool
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{i:02d}.png")
    script = ("from pathlib import Path\nfrom tandem.images import decode_files\n"
              "files = sorted(Path('.').glob('*.png'))\n"
              "try:\n    list(decode_files(files, 8, 1, workers=2))\n"
              "except Exception as err:\n    print(type(err).__name__, err)\n"
              "print(len([e for _, _, e in decode_files(files, 8, 1, workers=1) if e is None]))\n")
    # python - <<EOF: the workers cannot re-import a __main__ read from stdin, so the pool breaks.
    proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr
    assert lines[0].startswith("UserError an image decoding process stopped")
    assert "script read from standard input (python - <<EOF)" in lines[0] and "__name__ == '__main__'" in lines[0]
    assert "pass workers=1" in lines[0] and lines[1] == "16"  # and workers=1 is indeed the way out
