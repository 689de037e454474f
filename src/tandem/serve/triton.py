"""Triton `config.pbtxt` for a model of the repository, so Triton (or KServe) can serve the same folder. Torch-free.

    from tandem.serve.triton import triton_config, write_triton_config
    text = triton_config(manifest, 64, True, 2.0, "latest", name="animals")    # the file's text
    write_triton_config(Path("repo"), "animals", manifest, max_batch_size=64)  # repo/animals/config.pbtxt

The repository layout is already Triton's: REPO/<model>/<version>/model.onnx is the ONNX Runtime
backend's default file name, and Triton ignores the bundle's other files. The config names the platform,
the tensors (datatype, dims without the batch dimension), max batch size, version policy and dynamic
batching; the labels go to `labels.txt` beside it, referenced by the output's `label_filename`, so
Triton's classification extension answers with class names as tandem does.

A file tandem wrote starts with the line `# written by tandem; ...`; tandem rewrites only such files, so
a user who tunes the config (instance groups, optimization, ...) deletes that line and keeps the edits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Union

from tandem.errors import UserError
from tandem.files import write_text_atomic
from tandem.serve.config import check_model_name

CONFIG_FILE = "config.pbtxt"
LABEL_FILE = "labels.txt"
HEADER = "# written by tandem"
HEADER_LINE = (f"{HEADER}; tandem rewrites this file from the bundle's manifest and the serve config. "
               "Delete this line to keep your own edits.")
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"

# Open Inference Protocol datatype -> Triton's model_config.proto DataType.
DATA_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32", "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "BF16": "TYPE_BF16",
    "BYTES": "TYPE_STRING",
}

Versions = Union[str, Sequence[int]]


def _quote(text: str) -> str:
    """A protobuf text-format string literal (C escapes; other characters as UTF-8)."""
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def version_policy(versions: Versions) -> str:
    """'latest' | 'all' | [1, 3] -> the body of Triton's version_policy."""
    if versions == "latest":
        return "latest { num_versions: 1 }"
    if versions == "all":
        return "all { }"
    if isinstance(versions, (str, bytes)) or not isinstance(versions, Iterable):
        raise UserError(f'versions must be "latest", "all" or a list of version numbers; got {versions!r}')
    numbers = list(versions)
    if not numbers or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in numbers):
        raise UserError(f"versions must be a non-empty list of positive integers; got {numbers!r}")
    return "specific { versions: [" + ", ".join(str(v) for v in sorted(set(numbers))) + "] }"


def _tensors(manifest: dict, key: str) -> list[dict]:
    tensors = manifest.get(key)
    if not isinstance(tensors, list) or not tensors:
        raise UserError(f"the bundle's manifest has no {key}; re-export the bundle")
    for tensor in tensors:
        if not (isinstance(tensor, dict) and isinstance(tensor.get("name"), str) and tensor["name"]
                and isinstance(tensor.get("shape"), list) and tensor["shape"]
                and all(isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0) for d in tensor["shape"])):
            raise UserError(f"the bundle's manifest has a malformed entry in {key}: {tensor!r}; re-export the bundle")
        if tensor.get("datatype") not in DATA_TYPES:
            raise UserError(f"tensor {tensor['name']!r} has datatype {tensor.get('datatype')!r}, which Triton "
                            f"does not know (one of {', '.join(DATA_TYPES)})")
    return tensors


def _tensor_block(tensor: dict, batched: bool, label_filename: str | None) -> str:
    dims = tensor["shape"][1:] if batched else tensor["shape"]
    lines = [f"    name: {_quote(tensor['name'])}",
             f"    data_type: {DATA_TYPES[tensor['datatype']]}",
             f"    dims: [{', '.join(str(d) for d in dims)}]"]
    if label_filename:
        lines.append(f"    label_filename: {_quote(label_filename)}")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _label_output(outputs: list[dict], labels: list) -> str | None:
    """The one output whose last dimension holds one score per label, or None."""
    if not labels:
        return None
    matches = [t["name"] for t in outputs if t["shape"][-1] == len(labels)]
    return matches[0] if len(matches) == 1 else None


def _labels(manifest: dict) -> list[str]:
    labels = manifest.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise UserError("the bundle's manifest has malformed labels (not a list of strings); re-export the bundle")
    bad = [label for label in labels if "\n" in label or "\r" in label]
    if bad:
        raise UserError(f"label {bad[0]!r} holds a line break, which a Triton label file cannot hold")
    return labels


def triton_config(manifest: dict, max_batch_size: int = 64, dynamic_batching: bool = True,
                  max_queue_delay_ms: float = 2.0, versions: Versions = "latest", *, name: str,
                  label_filename: str | None = LABEL_FILE) -> str:
    """The text of Triton's config.pbtxt for a model whose versions are bundles with this manifest.

    name: the model's folder name (Triton requires the two to match). max_batch_size 0 turns batching off
    (dims then keep the batch dimension), as does a manifest whose first dimension is fixed rather than -1.
    label_filename: where the labels are written (None: no label file is referenced).
    """
    check_model_name(name)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise UserError(f"max_batch_size must be a non-negative integer; got {max_batch_size!r}")
    if not isinstance(max_queue_delay_ms, (int, float)) or isinstance(max_queue_delay_ms, bool) \
            or not max_queue_delay_ms >= 0 or max_queue_delay_ms == float("inf"):
        raise UserError(f"max_queue_delay_ms must be a non-negative number; got {max_queue_delay_ms!r}")
    inputs, outputs = _tensors(manifest, "inputs"), _tensors(manifest, "outputs")
    policy = version_policy(versions)
    # Triton's batching needs a variable first dimension on every tensor.
    batched = max_batch_size > 0 and all(t["shape"][0] == -1 for t in inputs + outputs)
    labelled = _label_output(outputs, _labels(manifest)) if label_filename else None

    parts = [HEADER_LINE,
             f"name: {_quote(name)}",
             f"platform: {_quote(PLATFORM)}",
             f"backend: {_quote(BACKEND)}",
             f"max_batch_size: {max_batch_size if batched else 0}",
             f"version_policy: {{ {policy} }}",
             "input [\n" + ",\n".join(_tensor_block(t, batched, None) for t in inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor_block(t, batched, label_filename if t["name"] == labelled else None)
                                       for t in outputs) + "\n]"]
    if batched and dynamic_batching:
        micros = int(round(float(max_queue_delay_ms) * 1000))
        parts.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {micros}\n}}")
    return "\n".join(parts) + "\n"


def is_tandem_config(path: Path) -> bool:
    """True when the file starts with the line tandem writes (so tandem may rewrite it)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readline().startswith(HEADER)
    except FileNotFoundError:
        return True


def write_triton_config(repo: str | Path, name: str, manifest: dict, *, max_batch_size: int = 64,
                        dynamic_batching: bool = True, max_queue_delay_ms: float = 2.0,
                        versions: Versions = "latest", force: bool = False) -> Path:
    """Write REPO/NAME/config.pbtxt (and REPO/NAME/labels.txt) atomically; returns the config's path.

    Refuses (UserError) to replace a config.pbtxt that tandem did not write (its first line is not
    tandem's), unless force=True.
    """
    check_model_name(name)
    folder = Path(repo) / name
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; a model's versions live in REPO/<model>/<version>/")
    path = folder / CONFIG_FILE
    if not force and not is_tandem_config(path):
        raise UserError(f"{path} was not written by tandem (its first line is not {HEADER!r}); "
                        "tandem leaves it alone. Delete it, or replace it with "
                        "`tandem serve REPO --write-triton-config --force`")
    labels = _labels(manifest)
    text = triton_config(manifest, max_batch_size, dynamic_batching, max_queue_delay_ms, versions, name=name,
                         label_filename=LABEL_FILE if labels else None)
    if labels and f"label_filename: {_quote(LABEL_FILE)}" in text:
        write_text_atomic(folder / LABEL_FILE, "".join(f"{label}\n" for label in labels))  # before the config names it
    write_text_atomic(path, text)
    return path
