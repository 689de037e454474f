"""Load a bundle (hashes verified) and classify arrays, PIL images, files and folders. Never imports torch.

    tandem predict bundle/ cat.png photos/ --top-k 3 [--json] [--precision auto|fp32|int8]

    predictor = Predictor.load("bundle/")                            # model.int8.onnx when the bundle has one
    predictor = Predictor.load("bundle/", precision="fp32")          # or always the fp32 model.onnx
    predictor = Predictor.load("bundle/", streams=2)                 # throughput: 2 batches at once, cores/2 threads each
    predictor.top_k([array, pil_image, "cat.png"], k=3)             # any image form, in memory
    pixels, fmt = predictor.decode(png_bytes)                        # what a server does: decode, preprocess, rank
    predictor.rank(run(predictor.preprocess(pixels[None])), k=3)
    for path, preds, error in predictor.predict_files(["photos/"]):  # files and folders, streamed
        print(path, preds[0].label if preds else error)
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from tandem.bundle import read_bundle_file, read_manifest, verify_bundle_signature, verify_files
from tandem.errors import UserError
from tandem.images import RESIZE_MODES, decode_file_batches, decode_image_bytes, expand_paths, to_pixels
from tandem.runtime.preprocess import preprocess
from tandem.threads import ThreadPolicy, choose

# The runtime's model files by precision. model.int8.onnx is optional: export keeps it only where it passed
# its accuracy and speed gates (tandem.export.quantize), and `auto` prefers it when the manifest lists it.
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
PRECISIONS = ("auto", *MODEL_FILES)


def bundle_precisions(manifest: dict) -> list[str]:
    """The precisions a bundle's manifest lists a model file for, fp32 first (the runtime reads no other file)."""
    files = manifest.get("files") or {}
    return [precision for precision, name in MODEL_FILES.items() if name in files]


def choose_precision(manifest: dict, precision: str, bundle: str | Path = "the bundle") -> str:
    """auto -> int8 when the manifest lists model.int8.onnx, else fp32; fp32 / int8 as asked, if it is there."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    listed = bundle_precisions(manifest)
    if precision == "auto":
        return "int8" if "int8" in listed else "fp32"
    if precision == "int8" and "int8" not in listed:
        raise UserError(f"bundle {bundle} has no int8 model ({MODEL_FILES['int8']}); use --precision fp32 or auto, "
                        "or export one with `tandem export RUN --out BUNDLE --int8`")
    return precision


def runtime_session_options(threads: int | None = None, wait: str = "passive") -> Any:
    """The ONNX Runtime options the runtime runs with (what `tandem bench` and export's speed gate time too).
    threads, wait: what tandem.threads.choose("onnxruntime") gives (None: ONNX Runtime's own count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The arena keeps every peak allocation for ever; without it RSS follows the work (onnxruntime #11627).
    options.enable_cpu_mem_arena = False
    # Spinning threads would take the cores from the processes decoding the next images (the policy's default).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if wait == "spin" else "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def best_classes(probs: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k most probable classes, best first, along the last axis (a tie goes to the lower
    index). The one ranking of tandem: the predictor, the server and the explanations all use it."""
    return np.argsort(-probs, axis=-1, kind="stable")[..., :min(k, probs.shape[-1])]


def ranked(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of logits (N, classes) -> (their float32 probabilities, each row's k best classes, best first)."""
    probs = softmax(logits.astype(np.float32, copy=True))
    return probs, best_classes(probs, k)


class Predictor:
    """A bundle ready to run: `logits`, `probabilities`, `top_k` over batches of any image form."""

    def __init__(self, session: Any, manifest: dict, batch_size: int = 256, precision: str = "fp32",
                 streams: int = 1) -> None:
        self.session = session
        # Streams: how many batches run at once (each on its own calling thread; ONNX Runtime's run is thread-safe).
        # Small convolutions spend much of a multi-threaded run waiting on each other; one thread per batch and
        # several batches at once keep every core busy (MLPerf's offline scenario; OpenVINO's throughput mode).
        self.streams = streams
        self.threads: ThreadPolicy | None = None  # what tandem.threads chose for the session (None: the caller's options)
        self._pool = ThreadPoolExecutor(streams, thread_name_prefix="tandem-stream") if streams > 1 else None
        self.manifest = manifest
        self.precision = precision  # which model file runs: fp32 (model.onnx) or int8 (model.int8.onnx)
        self.model_file = MODEL_FILES[precision]
        try:
            self.labels: list[str] = [str(label) for label in manifest["labels"]]
            pre = manifest["preprocessing"]
            self.image_size, self.channels = int(pre["image_size"]), int(pre["channels"])
            # One number, or one per channel: either is what preprocess takes.
            self.mean: float | list[float] = _number_or_list(pre["mean"])
            self.std: float | list[float] = _number_or_list(pre["std"])
            resize = pre.get("resize", "squash")
            self.input_name = manifest["inputs"][0]["name"]
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise UserError(f"the bundle's manifest.json lacks or garbles {err!s} (labels, preprocessing, inputs); "
                            "re-export the bundle") from None
        preprocess(np.zeros((1, 1, 1, self.channels), np.uint8), self.mean, self.std)  # a bad manifest fails here
        # Bundles made before resize modes resized every image to a square ("resize": "bilinear" or nothing).
        self.resize: str = "squash" if resize == "bilinear" else resize
        if self.resize not in RESIZE_MODES:
            raise UserError(f"the bundle's preprocessing.resize is {resize!r}; this tandem knows "
                            f"{', '.join(RESIZE_MODES)}: upgrade tandem to run it")
        self.batch_size = batch_size

    def _check_against_the_graph(self) -> None:
        """The manifest is not hashed (it holds the hashes), but the model file is, and it records its own labels,
        preprocessing and shapes: a manifest that disagrees with it was edited, and would mislabel answers."""
        meta = self.session.get_modelmeta().custom_metadata_map
        recorded = {key: json.loads(meta[f"tandem.{key}"]) for key in ("labels", "preprocessing") if f"tandem.{key}" in meta}
        edited = [key for key, value in recorded.items() if value != self.manifest[key]]
        inputs, outputs = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if inputs.name != self.input_name:
            edited.append("inputs")
        if list(inputs.shape[1:]) != [self.channels, self.image_size, self.image_size] and "preprocessing" not in edited:
            edited.append("preprocessing (channels, image_size)")
        if isinstance(outputs.shape[-1], int) and outputs.shape[-1] != len(self.labels) and "labels" not in edited:
            edited.append(f"labels ({len(self.labels)} for {outputs.shape[-1]} outputs)")
        if edited:
            raise UserError(f"the bundle's manifest.json disagrees with its {self.model_file} on {', '.join(edited)} "
                            "(edited after export?); re-export the bundle")

    @classmethod
    def load(cls, bundle: str | Path, verify: bool = True, threads: int | None = None, batch_size: int = 256,
             providers: list | None = None, session_options: Any = None,
             trusted_key: str | Path | None = None, precision: str = "auto", streams: int = 1) -> "Predictor":
        """Check the bundle, then open its model in ONNX Runtime from the very bytes that were checked.

        precision: auto (model.int8.onnx when the manifest lists one, else model.onnx), fp32 or int8
        (a UserError if the bundle has no int8 model); `predictor.precision` says which runs.
        trusted_key: a public key (PEM); the bundle must carry a signature by it (see `tandem keygen`).
        threads: ONNX Runtime's intra-op threads (default: tandem.threads' choice, the cores this process may use;
        OMP_NUM_THREADS wins). streams: batches run at once, for throughput (files, folders, big arrays); each gets
        threads // streams threads, and there may be no more streams than threads. 1 (the default) runs one batch
        at a time on all threads, the lowest latency for a single image.
        verify: check every listed file's sha256 (False skips the files the runtime does not read;
        the model file it runs is always checked). providers / session_options: passed to ONNX Runtime, for
        other execution providers (default: the CPU, with the memory arena off and no busy-waiting threads).
        """
        import onnxruntime as ort

        bundle = Path(bundle)
        if trusted_key is not None:
            verify_bundle_signature(bundle, trusted_key)  # origin first: the manifest read next is the signed one
        manifest = read_manifest(bundle, verify=False)
        precision = choose_precision(manifest, precision, bundle)
        name = MODEL_FILES[precision]
        model = read_bundle_file(bundle, manifest, name)  # checked here, on the bytes that are loaded
        if verify:
            verify_files(bundle, manifest, skip=(name,))
        if session_options is not None and threads:
            raise UserError("give either session_options or threads (set session_options.intra_op_num_threads)")
        if not isinstance(streams, int) or not 1 <= streams <= 256:
            raise UserError(f"streams must be a whole number from 1 to 256, got {streams!r}")
        policy = choose("onnxruntime", count=threads)  # the cores this process may use; OMP_NUM_THREADS wins
        available = policy.threads
        if streams > available:
            raise UserError(f"{streams} streams need at least {streams} threads (one each), but there are {available} "
                            f"({policy.reason}); give at most {available} streams")
        per_stream = max(1, available // streams)
        options = session_options if session_options is not None else runtime_session_options(per_stream, policy.wait)
        try:
            session = ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise UserError(f"bundle {bundle}: ONNX Runtime cannot load {name} ({str(err).splitlines()[0]})") from None
        predictor = cls(session, manifest, batch_size, precision, streams)
        predictor.threads = policy if session_options is None else None
        predictor._check_against_the_graph()
        return predictor

    def decode(self, data: bytes, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
        """One encoded image (PNG, JPEG, ...) -> (uint8 (H, W, C) at the bundle's size, channels and resize
        mode, its format); a UserError saying what is wrong. max_pixels: refuse larger images undecoded."""
        return decode_image_bytes(data, self.image_size, self.channels, self.resize, max_pixels)

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) -> the model's float32 (N, C, H, W) input, with the manifest's mean and std."""
        return preprocess(pixels, self.mean, self.std)

    def rank(self, scores: np.ndarray, k: int, probabilities: bool = False) -> list[list[Prediction]]:
        """Rows of logits (or of probabilities, with probabilities=True) -> each row's k most probable classes,
        best first."""
        if probabilities:
            return self._top_k(scores, k)
        return self._predictions(*ranked(scores, k))

    def pixels(self, images: Any) -> np.ndarray:
        """Any supported image form -> uint8 (N, H, W, C) at the bundle's size, channels and resize mode."""
        return to_pixels(images, self.image_size, self.channels, self.resize)

    def logits(self, images: Any) -> np.ndarray:
        return self._logits(self.pixels(images))

    def _logits(self, pixels: np.ndarray) -> np.ndarray:
        return self._in_pieces(len(pixels), lambda i, j: self._run(preprocess(pixels[i:j], self.mean, self.std)))

    def run_inputs(self, x: np.ndarray) -> np.ndarray:
        """Logits of inputs already preprocessed (float32 (N, C, H, W)), in pieces of batch_size, on the streams."""
        return self._in_pieces(len(x), lambda i, j: self._run(x[i:j]))

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def _in_pieces(self, n: int, run: Any) -> np.ndarray:
        # With streams, a batch is cut into one piece per stream (at least 8 images each) and the pieces run at once.
        size = self.batch_size if self._pool is None else min(self.batch_size, max(8, -(-n // self.streams)))
        pieces = [(i, min(n, i + size)) for i in range(0, n, size)]
        if self._pool is None or len(pieces) < 2:
            return np.concatenate([run(i, j) for i, j in pieces])
        return np.concatenate(list(self._pool.map(lambda piece: run(*piece), pieces)))

    def probabilities(self, images: Any) -> np.ndarray:
        return softmax(self.logits(images))

    def top_k(self, images: Any, k: int = 5) -> list[list[Prediction]]:
        _check_k(k)
        return self._top_k(softmax(self.logits(images)), k)

    def _top_k(self, probs: np.ndarray, k: int) -> list[list[Prediction]]:
        return self._predictions(probs, best_classes(probs, k))

    def _predictions(self, probs: np.ndarray, best: np.ndarray) -> list[list[Prediction]]:
        return [[Prediction(self.labels[j], int(j), float(row[j])) for j in order] for row, order in zip(probs, best)]

    def predict_files(self, paths: Iterable[str | Path], k: int = 5,
                      workers: int | None = None) -> Iterator[tuple[Path, list[Prediction] | None, str | None]]:
        """Files and folders (recursively, sorted) -> (file, top-k, None), or (file, None, message) for a file
        that cannot be read, in input order, streamed: each batch is classified as soon as it is decoded.

        Decoding runs in `workers` processes (default: every CPU; see tandem.images.decode_files). A bad file
        does not stop the rest: count the messages and decide at the end.
        """
        _check_k(k)
        files = expand_paths(paths)  # before the first result: a missing path is a mistake in the command
        return self._stream(files, k, workers)

    def _stream(self, files: list[Path], k: int,
                workers: int | None) -> Iterator[tuple[Path, list[Prediction] | None, str | None]]:
        # Classify whatever the decoder hands over (up to 16 files at a time): no result waits for a full batch.
        chunks = decode_file_batches(files, self.image_size, self.channels, self.resize, workers)
        # With streams, images are gathered until every stream has a piece of at least 8 (the decoder hands over
        # up to 16 at a time); with one stream, whatever is decoded runs at once.
        enough = 1 if self._pool is None else 8 * self.streams
        ready: list[tuple[Path, np.ndarray]] = []
        try:
            for chunk in chunks:
                for path, pixels, error in chunk:
                    if pixels is not None:
                        ready.append((path, pixels))
                        continue
                    yield from self._classify(ready, k)  # the files before the bad one, in order
                    ready = []
                    yield path, None, error
                if len(ready) >= enough:
                    yield from self._classify(ready, k)
                    ready = []
            yield from self._classify(ready, k)
        finally:
            chunks.close()  # stops the decoding pool when the caller stops early

    def _classify(self, ready: list[tuple[Path, np.ndarray]], k: int) -> Iterator[tuple[Path, list[Prediction], None]]:
        if ready:
            probs = softmax(self._logits(np.stack([pixels for _, pixels in ready])))
            for (path, _), preds in zip(ready, self._top_k(probs, k)):
                yield path, preds, None

    def predict_paths(self, paths: Iterable[str | Path], k: int = 5,
                      workers: int | None = None) -> list[tuple[Path, list[Prediction]]]:
        """Files and folders (recursively) -> [(file, top-k)] in a stable order; the first unreadable file
        raises a UserError naming it (use predict_files to go on past bad files)."""
        results = []
        stream = self.predict_files(paths, k, workers)
        try:
            for path, preds, error in stream:
                if error is not None:
                    raise UserError(error)
                results.append((path, preds))
        finally:
            stream.close()
        return results


def _check_k(k: int) -> None:
    if k < 1:
        raise UserError(f"top-k must be at least 1, got {k}")


def _number_or_list(value: Any) -> float | list[float]:
    try:
        return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)
    except (TypeError, ValueError):
        raise UserError(f"the bundle's preprocessing mean/std must be numbers, got {value!r}") from None
