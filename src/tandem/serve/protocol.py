"""The Open Inference Protocol v2 (KServe v2, as NVIDIA Triton speaks it): infer requests in, responses out.

    request = parse_infer(body, headers, spec, max_images)   # JSON or the binary tensor data extension
    body, headers = encode_infer(model, version, request, logits, labels, parameters)

Binary extension: the body is the JSON header, then the raw little-endian tensors in the order the JSON
lists them; `Inference-Header-Content-Length` says where the JSON ends, each binary input says its
`parameters.binary_data_size`. Outputs come back binary when asked (`binary_data` per output, or
`binary_data_output` for the request, which tritonclient sets when it names no outputs). The
classification extension (`parameters.classification: k`) returns k "value:index:label" strings per image.
Torch-free.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tandem.errors import UserError
from tandem.runtime.predictor import best_classes

HEADER_LENGTH = "inference-header-content-length"
DATATYPES = {"BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
             "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
             "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
             "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "BYTES": None}


class ProtocolError(UserError):
    """A request the server cannot take: its message goes back as {"error": ...} with `status`."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class NotFound(ProtocolError):
    status = 404


class Unavailable(ProtocolError):
    status = 503


@dataclass(frozen=True)
class TensorSpec:
    """What a model takes and gives, from its manifest: one input (N, C, H, W) and one output (N, K)."""

    input_name: str
    input_datatype: str
    input_shape: tuple[int, ...]          # without the batch dimension
    output_name: str
    output_datatype: str
    classes: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> "TensorSpec":
        inp, out = manifest["inputs"][0], manifest["outputs"][0]
        return cls(inp["name"], inp["datatype"], tuple(int(d) for d in inp["shape"][1:]),
                   out["name"], out["datatype"], int(out["shape"][-1]))


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    id: str | None
    array: np.ndarray                 # (N, *input_shape), float32, C-contiguous
    outputs: list[OutputRequest] = field(default_factory=list)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """tritonclient may gzip or deflate a request body; decompression stops at `limit` bytes (no bombs)."""
    if not encoding or encoding.lower() == "identity":
        return body
    encoding = encoding.lower()
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none", 415)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise ProtocolError(f"the body is not valid {encoding} ({err})") from None
    if len(out) > limit:
        raise ProtocolError(f"the decompressed body is larger than {limit} bytes (limits.max_body_bytes)", 413)
    return out


def json_object(raw: bytes, what: str) -> dict:
    """A JSON object, or a ProtocolError naming `what` (also for nesting too deep for the parser)."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(f"{what} is not valid JSON ({err})") from None
    except RecursionError:
        raise ProtocolError(f"{what} nests JSON too deeply") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{where}.parameters must be an object")
    return params


def _flag(params: dict, key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}.parameters.{key} must be true or false")
    return value


def parse_infer(body: bytes, header_length: str | None, spec: TensorSpec, max_images: int) -> InferRequest:
    """Check an infer request against the model's tensors; the input comes back as float32 (N, C, H, W)."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length must be a whole number, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length is {n} but the body has {len(body)} bytes")
        body, binary = body[:n], body[n:]
    request = json_object(body, "the request")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("the request's id must be a string")
    params = _parameters(request, "request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"the request must have \"inputs\": a list of one tensor, named {spec.input_name!r}")
    array, used = _input_array(inputs[0], binary, spec, max_images)
    if used != len(binary):
        raise ProtocolError(f"the body carries {len(binary)} bytes of binary tensor data but the inputs' "
                            f"binary_data_size add up to {used}")
    default_binary = _flag(params, "binary_data_output", "request")
    outputs = _outputs(request.get("outputs"), spec, default_binary)
    return InferRequest(request_id, array, outputs)


def _input_array(tensor: dict, binary: bytes, spec: TensorSpec, max_images: int) -> tuple[np.ndarray, int]:
    name = tensor.get("name")
    if name != spec.input_name:
        raise ProtocolError(f"unknown input {name!r}; this model takes one input named {spec.input_name!r}")
    datatype = tensor.get("datatype")
    if datatype != spec.input_datatype:
        raise ProtocolError(f"input {name!r} has datatype {datatype!r}; this model takes {spec.input_datatype}")
    shape = tensor.get("shape")
    expected = [-1, *spec.input_shape]
    if (not isinstance(shape, list) or len(shape) != len(expected)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or list(shape[1:]) != list(spec.input_shape) or not 1 <= shape[0] <= max_images):
        raise ProtocolError(f"input {name!r} has shape {shape!r}; this model takes {expected} with 1 to "
                            f"{max_images} images in the first dimension")
    count = math.prod(shape)
    dtype = DATATYPES[datatype]
    params = _parameters(tensor, f"input {name!r}")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise ProtocolError(f"input {name!r} has both data and parameters.binary_data_size; send one")
        if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
            raise ProtocolError(f"input {name!r}: binary_data_size is {size!r}, but shape {shape} of {datatype} "
                                f"needs {count * dtype.itemsize} bytes")
        if size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size is {size} but only {len(binary)} bytes follow "
                                "the JSON header")
        array = np.frombuffer(binary, dtype=dtype, count=count).reshape(shape)
        used = size
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise ProtocolError(f"input {name!r} needs \"data\" (a list of numbers, flat or nested) or "
                                "parameters.binary_data_size with the binary extension")
        try:
            array = np.asarray(data)
            if array.dtype.kind not in "iuf":  # strings, booleans, objects (ragged or too big for a float)
                raise ValueError
            array = array.astype(np.float64)
        except (TypeError, ValueError, OverflowError, RecursionError):
            raise ProtocolError(f"input {name!r}: data must be numbers only (no strings, booleans or values beyond "
                                "float range), as a flat or evenly nested list") from None
        if array.size != count:
            raise ProtocolError(f"input {name!r}: data has {array.size} values, shape {shape} needs {count}")
        array = array.reshape(shape)
        used = 0
    with np.errstate(over="ignore", invalid="ignore"):  # too big for FP32 becomes inf, refused next
        array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ProtocolError(f"input {name!r} holds NaN or infinity; send finite numbers")
    return array, used


def _outputs(requested: Any, spec: TensorSpec, default_binary: bool) -> list[OutputRequest]:
    if requested is None:
        return [OutputRequest(spec.output_name, default_binary)]
    if not isinstance(requested, list) or not requested:
        raise ProtocolError("\"outputs\" must be a non-empty list of {\"name\": ...}")
    out = []
    for item in requested:
        if not isinstance(item, dict) or item.get("name") != spec.output_name:
            got = item.get("name") if isinstance(item, dict) else item
            raise ProtocolError(f"unknown output {got!r}; this model gives one output named {spec.output_name!r}")
        params = _parameters(item, f"output {spec.output_name!r}")
        binary = _flag(params, "binary_data", "output") if "binary_data" in params else default_binary
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ProtocolError("parameters.classification must be a whole number of classes (>= 1)")
        out.append(OutputRequest(spec.output_name, binary, min(k, spec.classes)))
    return out


def classification(logits: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Triton's classification extension: the top k per row as b"value:index:label", best first."""
    best = best_classes(logits, k)  # the logits' order is the probabilities'
    return np.array([[f"{row[j]:f}:{j}:{labels[j]}".encode() for j in order] for row, order in zip(logits, best)],
                    dtype=object)


def encode_infer(model: str, version: int, request: InferRequest, logits: np.ndarray, labels: list[str],
                 parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (binary outputs follow the JSON header in the order listed)."""
    outputs, chunks = [], []
    for out in request.outputs:
        if out.classification:
            values = classification(logits, out.classification, labels)
            datatype, shape = "BYTES", list(values.shape)
            raw = b"".join(struct.pack("<I", len(v)) + v for v in values.ravel()) if out.binary else None
            data = None if out.binary else [v.decode() for v in values.ravel()]
        else:
            datatype, shape = "FP32", list(logits.shape)
            raw = np.ascontiguousarray(logits, dtype="<f4").tobytes() if out.binary else None
            data = None if out.binary else logits.ravel().tolist()
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": shape}
        if raw is not None:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request.id is not None:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    response["outputs"] = outputs
    header = json.dumps(response, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {"content-type": "application/octet-stream",
                                       "inference-header-content-length": str(len(header))}
