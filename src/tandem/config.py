"""The typed, validated run config: YAML in, YAML out, `key=value` overrides. Torch-free.

    cfg = load_config("run.yaml", ["optim.lr=0.01", "epochs=5"])
    print(dump_config(cfg))

Defaults live here and only here; every checkpoint and every bundle carries the resolved config.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tandem.errors import UserError


class _Section(BaseModel):
    # coerce_numbers_to_str: `out_dir=2024` on the command line is a folder name, not a number.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class DataConfig(_Section):
    source: str = Field("animals", description="'animals' (embedded), a folder with one sub-folder per class, or an .npz with x and y")
    image_size: int = Field(28, ge=8, le=512, description="images are resized to image_size x image_size")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    skip_bad_files: bool = Field(False, description="skip unreadable images with a warning instead of stopping")
    resize: Literal["crop", "pad", "squash"] = Field(
        "crop", description="non-square images: crop (centre square), pad (black borders) or squash")
    # One value for every channel, or one per channel ([0.485, 0.456, 0.406] for ImageNet-style RGB).
    mean: Union[float, list[float]] = Field(0.5, description="preprocessing: (pixel/255 - mean) / std, per channel or one value")
    std: Union[float, list[float]] = Field(0.5, description="one value > 0, or one per channel")
    stream: Literal["auto", "on", "off"] = Field(
        "auto", description="image folders: decode batches from disk in worker processes instead of holding the "
                            "split in memory (auto: when its pixels, uint8 and their float32 copy, would take more "
                            "than a quarter of the available memory)")
    workers: int = Field(2, ge=0, le=256, description="streamed folders: DataLoader worker processes (0 = decode in "
                                                      "the training process)")

    @field_validator("stream", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare on / off as true / false: `data.stream=on` means "on".
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check_normalisation(self) -> "DataConfig":
        for name in ("mean", "std"):
            value = getattr(self, name)
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and len(value) not in (1, self.channels):
                raise ValueError(f"data.{name} has {len(value)} values; give one, or one per channel ({self.channels})")
            if name == "std" and min(values) <= 0:
                raise ValueError(f"data.std must be greater than 0 (got {value})")
        return self


class ModelConfig(_Section):
    name: Literal["mlp", "cnn", "cnn-fpga", "resnet"] = Field(
        "cnn", description="mlp, cnn, cnn-fpga (the cnn at FPGA size, about 3k parameters: export --fpga) or resnet")
    width: int = Field(16, ge=4, le=512, description="channels of the first stage (hidden units / 8 for mlp; "
                                                     "of the last stage for cnn-fpga)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class OptimConfig(_Section):
    name: Literal["adamw", "sgd"] = Field("sgd", description="sgd (Nesterov momentum) or adamw")
    lr: float = Field(0.1, gt=0.0, le=10.0, description="peak learning rate (0.1 suits sgd; about 5e-3 suits adamw)")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (AdamW uses beta1 = 0.9)")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches summed per optimizer step")


class ScheduleConfig(_Section):
    name: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = Field(0.25, ge=0.0, le=0.9, description="share of steps spent warming up")


class AugmentConfig(_Section):
    shift: int = Field(2, ge=0, le=16, description="random shift in pixels, per image")
    hflip: bool = Field(True, description="random horizontal flip, per image")


class ParallelConfig(_Section):
    strategy: Literal["ddp", "local-sgd", "tensor", "pipeline"] = Field(
        "ddp", description="under torchrun: ddp (all-reduce gradients), local-sgd (average parameters every "
                           "average_every steps), tensor (layers split across ranks) or pipeline (stages); one process: "
                           "all of them are the same plain run")
    average_every: int = Field(8, ge=1, le=100000, description="local-sgd: local steps between parameter averages")
    data: int = Field(1, ge=1, le=4096, description="tensor / pipeline: data-parallel replicas of the model "
                                                    "(a 2-D mesh: processes = data x stages)")
    stages: int = Field(0, ge=0, le=1024, description="pipeline: stages (0 = processes / data)")
    microbatches: int = Field(4, ge=1, le=4096, description="pipeline: micro-batches per step")
    schedule: Literal["gpipe", "1f1b"] = Field("1f1b", description="pipeline schedule: gpipe (all forwards, then "
                                                                     "all backwards) or 1f1b (one forward, one backward)")
    timeout: int = Field(300, ge=5, le=86400, description="seconds a rank waits for the others (start-up, collectives) "
                                                          "before the job fails")


class ThreadsConfig(_Section):
    count: Union[Literal["auto"], int] = Field(
        "auto", description="torch's intra-op threads: auto = the cores this process may use (affinity, cgroup "
                            "quota, torchrun's share), fewer where other work keeps them busy at start; "
                            "OMP_NUM_THREADS wins")
    wait: Literal["auto", "spin", "passive"] = Field(
        "auto", description="how idle threads wait: spin (briefly, then sleep; fastest on idle cores) or passive "
                            "(sleep at once; beside other work); auto = passive when other work was measured; "
                            "OMP_WAIT_POLICY wins")

    @field_validator("count", mode="before")
    @classmethod
    def _auto_or_count(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024):
            return value
        raise ValueError(f"threads.count must be auto or a whole number from 1 to 1024 (got {value!r})")


class TrainConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    augment: AugmentConfig = AugmentConfig()
    parallel: ParallelConfig = ParallelConfig()
    threads: ThreadsConfig = ThreadsConfig()
    batch_size: int = Field(128, ge=1, le=65536, description="images per optimizer step, over all processes")
    epochs: int = Field(22, ge=1, le=10000)
    max_steps: int = Field(0, ge=0, description="stop after this many optimizer steps (0 = no limit)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPUs and CPUs with native bf16, else fp32")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: Literal["off", "auto", "graphs", "inductor"] = Field(
        "off", description="how each step runs: off = eager; graphs = the whole step (batch, augmentation, forward, "
                           "backward, optimizer) captured once in a CUDA graph and replayed; inductor = torch.compile "
                           "on the model; auto = graphs on a CUDA GPU in one process with the data in memory, else "
                           "off (the default once the capture has been checked on a GPU)")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    out_dir: str = Field("", description="run folder; empty: a new runs/<date>-<time>, with runs/latest linked to it")
    overwrite: bool = Field(False, description="clear out_dir first if it holds another run (else the run is refused)")
    init_from: str = Field("", description="a bundle to fine-tune: start from its weights (a new head if the classes differ)")
    checkpoint_every: int = Field(0, ge=0, description="save every N optimizer steps (0 = each epoch); always at the end")
    keep_checkpoints: int = Field(3, ge=1, le=1000)
    early_stopping: int = Field(0, ge=0, description="stop when validation accuracy has not improved for N epochs (0 = off)")
    progress: bool = Field(True, description="progress bar on a terminal")

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare off as false: `compile=off` means "off".
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.batch_size % self.optim.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of optim.grad_accum={self.optim.grad_accum}")
        return self


# Pydantic names the member of a union it tried (data.mean.float): not part of the key the user wrote.
_TYPE_TAGS = ("float", "int", "str", "bool", "list[float]")


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-") and p not in _TYPE_TAGS)


def explain_validation(err: ValidationError, keys: list[str] | None = None) -> str:
    """The one-line message of a validation error; `keys` (every dotted key) adds a did-you-mean to a typo."""
    first = err.errors()[0]
    path = _field_path(first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{path}'{_did_you_mean(path, keys)}; run `tandem config` to see every key and its default"
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    message = first["msg"].removeprefix("Value error, ").rstrip(".")
    if first["type"] == "value_error":
        return f"config: {message}"
    return f"config: {path}: {message}{got_text}"


def _did_you_mean(path: str, keys: list[str] | None) -> str:
    if not keys:
        return ""
    known = set(keys) | {key.rsplit(".", i)[0] for key in keys for i in range(1, key.count(".") + 1)}  # and sections
    close = difflib.get_close_matches(path, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """['optim.lr=0.01', 'epochs=3'] -> {'optim': {'lr': 0.01}, 'epochs': 3} (values read as YAML)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}' is not key=value; write e.g. optim.lr=0.01")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(tree: dict) -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(explain_validation(err, [key for key, _, _ in describe_keys()])) from None


def read_yaml_mapping(path: str | Path, what: str, hint: str) -> dict:
    """A YAML file holding a mapping; UserError naming `what` (and the line) otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a YAML file")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {hint}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text file; give a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{what} {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(tree, dict):
        raise UserError(f"{what} {path} must be a mapping of keys to values")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file (optional), apply `key=value` overrides, validate."""
    tree = {} if path is None else read_yaml_mapping(path, "config file", "give a YAML file or only key=value overrides")
    return config_from_dict(_merge(tree, parse_overrides(overrides or [])))


def with_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A copy of cfg with `key=value` overrides applied and validated."""
    return config_from_dict(_merge(cfg.model_dump(), parse_overrides(overrides)))


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def describe_keys(root: type[BaseModel] | None = None) -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) for every key of root (default: the run config): what `tandem config`
    and `tandem serve --help-config` print."""
    rows = []

    def walk(model_cls: type[BaseModel], prefix: str) -> None:
        for name, field in model_cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            else:
                default = field.default if field.default_factory is None else field.default_factory()
                rows.append((f"{prefix}{name}", default, field.description or ""))

    walk(root or TrainConfig, "")
    return rows
