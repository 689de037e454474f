"""The serve config: YAML in, validated, every key optional. Torch-free.

    tandem serve REPO --config serve.yaml

    host: 0.0.0.0
    port: 8000
    auth: {token_env: TANDEM_TOKEN, admin_token_env: TANDEM_ADMIN_TOKEN}   # tokens never live in the file
    batching: {enabled: true, max_batch_size: 64, max_queue_delay_ms: 2}
    models:
      animals: {versions: latest, batching: {max_batch_size: 128}}
    store: {url: "postgresql://tandem@db:5432/tandem"}
    explain: {max_concurrent: 1}    # POST /v2/models/<m>/explain: occlusion heatmaps and rule paths

`tandem serve --help-config` lists every key with its default and meaning.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tandem.config import describe_keys, explain_validation, read_yaml_mapping
from tandem.errors import UserError

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a folder name, never a path ("..", "a/b")


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise UserError(f"model name {name!r} is not allowed: use letters, digits, '_', '.', '-' "
                        "(at most 64, starting with a letter or digit)")
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuthConfig(_Section):
    token_env: str = Field("TANDEM_TOKEN", description="environment variable holding the inference token")
    token_file: Optional[str] = Field(None, description="or a file holding it (first line)")
    admin_token_env: str = Field("TANDEM_ADMIN_TOKEN", description="environment variable holding the admin token")
    admin_token_file: Optional[str] = Field(None, description="or a file holding it (first line)")
    protect_inference: Optional[bool] = Field(
        None, description="require the inference token (default: yes when one is configured)")
    protect_metrics: bool = Field(False, description="require the admin token for /metrics")


class LimitsConfig(_Section):
    max_body_bytes: int = Field(16 << 20, ge=1024, description="largest request body accepted (413 above)")
    request_timeout_s: float = Field(30.0, gt=0, description="a request not answered by then gets a 504")
    max_image_pixels: int = Field(40_000_000, ge=1024, description="largest image (width x height) decoded")
    max_images_per_request: int = Field(1024, ge=1, description="largest batch one infer request may carry")


class ExplainConfig(_Section):
    enabled: bool = Field(True, description="POST /v2/models/<m>/explain: an occlusion heatmap and the rule path "
                                            "of one image (off: 403)")
    max_image_bytes: Optional[int] = Field(None, ge=1024, description="largest image an explain request may send "
                                           "(413 above; default: limits.max_body_bytes, what classify takes)")
    max_image_pixels: Optional[int] = Field(None, ge=1024, description="largest image (width x height) decoded to "
                                            "explain (default: limits.max_image_pixels, what classify takes)")
    max_windows: int = Field(1024, ge=1, description="most occluded copies of one image (window positions; "
                                                     "tandem.explain.occlusion.MAX_OCCLUDED caps it too)")
    max_concurrent: int = Field(1, ge=1, le=64, description="explanations computed at once (the others wait their turn)")
    max_waiting: int = Field(16, ge=0, description="explanations waiting for their turn; beyond that, 503")


class BatchingConfig(_Section):
    enabled: bool = Field(True, description="dynamic batching: run queued requests together")
    max_batch_size: int = Field(64, ge=1, le=4096, description="most images in one run of the model")
    max_queue_delay_ms: float = Field(2.0, ge=0, le=1000, description="how long a request may wait for others")
    max_queue_size: int = Field(4096, ge=1, description="images waiting per model version; beyond it, 503")


class BatchingOverride(_Section):
    enabled: Optional[bool] = None
    max_batch_size: Optional[int] = Field(None, ge=1, le=4096)
    max_queue_delay_ms: Optional[float] = Field(None, ge=0, le=1000)
    max_queue_size: Optional[int] = Field(None, ge=1)


VersionPolicy = Union[Literal["latest", "all"], list[Annotated[int, Field(strict=True)]]]


class ModelSettings(_Section):
    versions: VersionPolicy = Field("latest", description="latest, all, or a list of version numbers")
    precision: Literal["auto", "fp32", "int8"] = Field(
        "auto", description="auto: model.int8.onnx where a bundle has one (export --int8), else model.onnx; fp32: "
                            "always model.onnx, as Triton serves the same repository")
    batching: BatchingOverride = BatchingOverride()

    @field_validator("versions")
    @classmethod
    def _positive(cls, value):
        if isinstance(value, list) and (not value or min(value) < 1):
            raise ValueError("give positive version numbers, e.g. [1, 3]")
        return value


class StoreConfig(_Section):
    url: str = Field("sqlite:///tandem-serve.sqlite",
                     description="sqlite:///path (or a path), or postgresql://user@host:port/db")
    keep_images: bool = Field(True, description="store the input image with its feedback")
    max_image_bytes: int = Field(2_000_000, ge=0, description="inputs larger than this are not kept")
    image_cache_bytes: int = Field(64 << 20, ge=0, description="memory for recent inputs awaiting feedback")
    sync: Literal["normal", "full"] = Field("normal", description="SQLite: normal survives a killed process, full a power cut")


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535)
    threads: int = Field(0, ge=0, description="ONNX Runtime threads per model (0: the cores this process may use, "
                                              "tandem.threads; OMP_NUM_THREADS wins)")
    top_k: int = Field(5, ge=1, description="classes returned by /classify unless the request says")
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    batching: BatchingConfig = BatchingConfig()
    models: dict[str, ModelSettings] = Field(default_factory=dict, description="per-model settings")
    store: StoreConfig = StoreConfig()
    explain: ExplainConfig = ExplainConfig()
    access_log: str = Field("-", description="'-': one JSON line per request on stderr; a file path; or 'off'")

    def model(self, name: str) -> ModelSettings:
        return self.models.get(name, ModelSettings())

    def batching_for(self, name: str) -> BatchingConfig:
        override = self.model(name).batching.model_dump(exclude_none=True)
        return self.batching.model_copy(update=override)


def _read_secret(env: str, file: str | None, what: str) -> str | None:
    if file:
        try:
            text = Path(file).read_text().strip().splitlines()
        except OSError as err:
            raise UserError(f"cannot read the {what} file {file} ({err.strerror}); fix auth.{what}_file") from None
        if not text or not text[0].strip():
            raise UserError(f"the {what} file {file} is empty; put the token on its first line")
        return text[0].strip()
    value = os.environ.get(env, "").strip()
    return value or None


def tokens(auth: AuthConfig) -> tuple[str | None, str | None]:
    """(inference token, admin token), each None when not configured."""
    token = _read_secret(auth.token_env, auth.token_file, "token")
    admin = _read_secret(auth.admin_token_env, auth.admin_token_file, "admin_token")
    return token, admin


def load_serve_config(path: str | Path | None = None, overrides: dict | None = None) -> ServeConfig:
    tree = {} if path is None else read_yaml_mapping(path, "serve config", "give a YAML file (keys: `tandem serve --help-config`)")
    tree.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return ServeConfig.model_validate(tree)
    except ValidationError as err:
        keys = [key for key, _, _ in describe_keys(ServeConfig)]
        message = explain_validation(err, keys).replace("`tandem config`", "`tandem serve --help-config`")
        raise UserError(message.replace("config: ", "serve config: ", 1).replace("config key", "serve config key")) from None


def describe_serve_keys() -> list[tuple[str, object, str]]:
    """Every serve setting; `models` is a map, so its per-model keys are spelled out."""
    rows = [row for row in describe_keys(ServeConfig) if row[0] != "models"]
    rows.append(("models.<name>.versions", "latest", ModelSettings.model_fields["versions"].description))
    rows.append(("models.<name>.batching.*", None, "overrides of batching.* for that model"))
    return rows
