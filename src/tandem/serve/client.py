"""The device side of `tandem serve`: send encoded images, get labels back. Python's standard library only.

    from tandem.serve.client import classify, feedback
    reply = classify("127.0.0.1:8000", "cat.jpg", top_k=3, token=None)   # or the image's bytes
    reply["top_k"][0]["label"], reply["prediction_id"]
    feedback("127.0.0.1:8000", reply["model"], reply["prediction_id"], "zebra")   # "that was a zebra"

The image travels as it is (PNG, JPEG, ...): the server decodes and preprocesses it as the bundle's
manifest says, so a device needs neither numpy nor the model. `tandem client URL IMAGE...` is
`run_client`. Failures are UserErrors with one line: an unreachable server, or what the server said
(its {"error": ...} message and the HTTP status); `ServerError.status` holds the status.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tandem.errors import UserError

TOKEN_ENV = "TANDEM_TOKEN"
DEFAULT_TIMEOUT = 30.0
# Statuses that would be the same for every image (bad token, unknown model or version): stop at the first.
FATAL_STATUSES = (401, 403, 404)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ServerError(UserError):
    """The server answered with an error status, not with JSON, not in time, or dropped the connection."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Unreachable(UserError):
    """No connection to the server (refused, unknown host, connect timeout)."""


def base_url(url: str) -> str:
    """'127.0.0.1:8000' -> 'http://127.0.0.1:8000'; http(s) URLs stay (without a trailing slash)."""
    url = url.strip()
    if not url:
        raise UserError("the server URL is empty; give one like http://127.0.0.1:8000")
    if not _SCHEME.match(url):
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"{url!r} is not an http(s) URL; give one like http://127.0.0.1:8000")
    return url.rstrip("/")


def _error_message(body: bytes) -> str | None:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return str(error) if error else None


def _call(method: str, url: str, path: str, *, body: bytes | None = None, content_type: str | None = None,
          token: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """One request; the decoded JSON reply, or a one-line UserError / ServerError."""
    base = base_url(url)
    headers = {"Accept": "application/json", "User-Agent": "tandem-client"}
    if content_type:
        headers["Content-Type"] = content_type
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, reply_type, data = response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as err:  # before URLError: it is one
        try:
            data = err.read() or b""
        except (OSError, http.client.HTTPException):
            data = b""
        message = _error_message(data)
        if message is None:
            message = f"{err.reason or 'error'} (no JSON error message: is {base} a tandem server?)"
        if err.code == 401 and not token:
            message += f"; pass --token or set {TOKEN_ENV}"
        raise ServerError(f"{message} (HTTP {err.code} from {method} {path.split('?')[0]})", err.code) from None
    except urllib.error.URLError as err:
        reason = getattr(err.reason, "strerror", None) or str(err.reason)
        raise Unreachable(f"cannot reach {base} ({reason}); is `tandem serve` running?") from None
    except TimeoutError:
        raise ServerError(f"no answer from {base} within {timeout:g} s ({method} {path.split('?')[0]})") from None
    except (OSError, http.client.HTTPException) as err:  # reset or closed mid-request or mid-answer
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ServerError(f"{base} dropped the connection ({reason}) during {method} {path.split('?')[0]}") from None
    try:
        return json.loads(data)
    except ValueError:
        kind = reply_type.split(";")[0] or "no Content-Type"
        raise ServerError(f"{base} answered {method} {path.split('?')[0]} with HTTP {status} but not JSON ({kind}); "
                          "is it a tandem server?", status) from None


def _quote(name: str) -> str:
    return urllib.parse.quote(str(name), safe="")


def list_models(url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
    """GET /v1/models: the served models with their versions, labels and preprocessing."""
    reply = _call("GET", url, "/v1/models", token=token, timeout=timeout)
    models = reply.get("models") if isinstance(reply, dict) else None
    if not isinstance(models, list):
        raise ServerError(f"{base_url(url)}/v1/models did not answer with a model list; is it a tandem server?")
    return models


def only_model(url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The name of the one model the server serves; a UserError naming them when there are several."""
    names = [str(m.get("name")) for m in list_models(url, token, timeout) if isinstance(m, dict)]
    if len(names) == 1:
        return names[0]
    if not names:
        raise UserError(f"{base_url(url)} serves no model yet; add a bundle to its repository")
    raise UserError(f"{base_url(url)} serves {len(names)} models ({', '.join(sorted(names))}); pick one with --model")


def _image(image: str | Path | bytes | bytearray | memoryview) -> tuple[bytes, str]:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "application/octet-stream"
    path = Path(image)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; give image files") from None
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err})") from None
    return data, mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def classify(url: str, image: str | Path | bytes, model: str | None = None, version: int | None = None,
             top_k: int = 5, token: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """POST the encoded image to /v1/models/{model}/classify; the server's reply:
    {"prediction_id", "model", "version", "top_k": [{"label", "index", "probability"}], "latency_ms": {...}}.

    model None: the server's only model (a UserError listing them when it serves several).
    version None: the latest version the server serves.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"top_k must be a positive integer; got {top_k!r}")
    data, content_type = _image(image)
    if model is None:
        model = only_model(url, token, timeout)
    query = {"top_k": top_k}
    if version is not None:
        query["version"] = version
    path = f"/v1/models/{_quote(model)}/classify?{urllib.parse.urlencode(query)}"
    reply = _call("POST", url, path, body=data, content_type=content_type, token=token, timeout=timeout)
    if not (isinstance(reply, dict) and isinstance(reply.get("top_k"), list) and "prediction_id" in reply):
        raise ServerError(f"{base_url(url)} answered classify without top_k and prediction_id; is it a tandem server?")
    return reply


def feedback(url: str, model: str, prediction_id: str, label: str, token: str | None = None,
             timeout: float = DEFAULT_TIMEOUT) -> dict:
    """POST /v1/models/{model}/feedback: the true label of an earlier prediction ->
    {"feedback_id", "prediction_id", "label", "image_stored"}."""
    body = json.dumps({"prediction_id": prediction_id, "label": label}).encode()
    return _call("POST", url, f"/v1/models/{_quote(model)}/feedback", body=body, content_type="application/json",
                 token=token, timeout=timeout)


def _print_json(record: dict) -> None:
    print(json.dumps(record), flush=True)


def run_client(url: str, images: list[str], model: str | None = None, version: int | None = None, top_k: int = 1,
               token: str | None = None, as_json: bool = False, feedback_label: str | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> int:
    """`tandem client URL IMAGE...`: classify each image (folders searched recursively) on the server and
    print `path: label 97.1%  ...` lines, or JSON Lines {path, prediction_id, model, version, top_k} /
    {path, error} with as_json. feedback_label: send it as each image's true label (adds "feedback").
    token None: $TANDEM_TOKEN. 0 when every image was classified, 1 when some failed; a UserError (the
    CLI's exit 2) when the server cannot be reached or refuses them all (bad token, unknown model).
    """
    from tandem.images import expand_paths

    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    files = expand_paths(images)
    if model is None:
        model = only_model(url, token, timeout)
    if feedback_label is not None:
        _check_label(url, model, feedback_label, token, timeout)
    failed = 0
    for path in files:
        try:
            reply = classify(url, path, model=model, version=version, top_k=top_k, token=token, timeout=timeout)
            given = None
            if feedback_label is not None:
                given = feedback(url, reply.get("model", model), reply["prediction_id"], feedback_label, token, timeout)
        except Unreachable:
            raise
        except UserError as err:  # this image: unreadable, refused by the server, timed out
            if isinstance(err, ServerError) and err.status in FATAL_STATUSES:
                raise  # the same for every image: a bad token, an unknown model or version
            failed += 1
            _report_error(path, str(err), as_json)
            continue
        top = [{"label": p.get("label"), "index": p.get("index"), "probability": p.get("probability")}
               for p in reply["top_k"]]
        if as_json:
            record = {"path": str(path), "prediction_id": reply.get("prediction_id"), "model": reply.get("model"),
                      "version": reply.get("version"), "top_k": top}
            if given is not None:
                record["feedback"] = given
            _print_json(record)
        else:
            line = f"{path}: " + "  ".join(f"{p['label']} {float(p['probability']):.1%}" for p in top)
            if given is not None:
                line += f"  (feedback {feedback_label!r} stored as #{given.get('feedback_id')})"
            print(line, flush=True)
    if failed:
        print(f"error: {failed} of {len(files)} image(s) failed; the others were classified", file=sys.stderr)
        return 1
    return 0


def _check_label(url: str, model: str, label: str, token: str | None, timeout: float) -> None:
    """Refuse a feedback label the model does not know before sending any image."""
    for entry in list_models(url, token, timeout):
        if isinstance(entry, dict) and entry.get("name") == model and isinstance(entry.get("labels"), list):
            if label not in entry["labels"]:
                raise UserError(f"{label!r} is not one of model {model}'s labels ({', '.join(map(str, entry['labels']))})")
            return


def _report_error(path: Path, message: str, as_json: bool) -> None:
    if as_json:
        _print_json({"path": str(path), "error": message})
    else:
        print(f"error: {path}: {message}", file=sys.stderr, flush=True)
