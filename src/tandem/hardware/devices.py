"""Device profiles: peak ops per precision, memory bandwidth and size, power, each figure with its source.
Torch-free.

    devices = load_devices()                      # the built-in devices.yaml
    devices = load_devices("my_devices.yaml")     # plus (or replacing) the entries of another file
    devices["rpi5"].peak("int8"), devices["rpi5"].memory.value

A bad entry is refused in one line that names the file, the entry and the field:
    device file my.yaml: entry 'rpi5', field peak_ops.fp32.value: must be greater than 0 (got -1.0)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tandem.errors import UserError

BUILTIN = Path(__file__).with_name("devices.yaml")
Precision = Literal["fp32", "fp16", "bf16", "int8"]
KINDS = ("cpu", "gpu", "asic", "fpga", "mcu")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


def _number(value: Any) -> Any:
    # YAML 1.1 (PyYAML) reads 1e9 (no dot, no sign) as a string: take it as the number it means. Not a bool.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"must be a number (got {value!r})") from None
    return value


class Figure(BaseModel):
    """One number and where it comes from; `estimate` says how a derived figure was worked out."""

    model_config = ConfigDict(extra="forbid")
    value: float = Field(ge=0, allow_inf_nan=False)
    source: str = Field(min_length=1)
    estimate: str | None = None

    _as_number = field_validator("value", mode="before")(_number)


class PositiveFigure(Figure):
    value: float = Field(gt=0)


class Device(BaseModel):
    """One device profile (see the header of devices.yaml for the meaning of each field)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    title: str = Field(min_length=1)
    kind: Literal["cpu", "gpu", "asic", "fpga", "mcu"]
    precisions: list[Precision] = Field(min_length=1)
    train_precisions: list[Precision] = []
    peak_ops: dict[Precision, PositiveFigure]
    # The fewest multiply-accumulates one output of a Conv / Gemm costs at that precision: a layer of smaller
    # reduction depth (C_in x kernel area) takes as long as one of this depth (the host's int8, measured).
    min_depth: dict[Precision, PositiveFigure] = {}
    memory_bandwidth: PositiveFigure
    memory: PositiveFigure
    weight_memory: PositiveFigure | None = None
    power: PositiveFigure | None = None
    runtime_overhead: Figure
    train_overhead: Figure | None = None
    run_overhead: Figure | None = None     # seconds of fixed cost per inference call
    kernel_overhead: Figure | None = None  # seconds of fixed cost per kernel launched (a GPU's launch latency)
    on_chip: bool = False
    measured: bool = False  # the host: figures measured by tandem.hardware.probe, not read from a datasheet

    @model_validator(mode="after")
    def _complete(self) -> Device:
        unknown = [p for p in self.min_depth if p not in self.peak_ops]
        if unknown:
            raise ValueError(f"[min_depth] has a figure for {', '.join(unknown)}, which peak_ops does not list")
        for field in ("precisions", "train_precisions"):
            missing = [p for p in getattr(self, field) if p not in self.peak_ops]
            if missing:
                raise ValueError(f"[peak_ops] has no figure for {', '.join(missing)}, listed in {field}")
        if self.train_precisions and self.train_overhead is None:
            raise ValueError("[train_overhead] is required when train_precisions is not empty")
        return self

    def peak(self, precision: str) -> float:
        return self.peak_ops[precision].value

    def figures(self) -> dict[str, Figure]:
        """Every figure by its dotted field name, for tables."""
        out = {f"peak_ops.{p}": f for p, f in self.peak_ops.items()}
        out.update({f"min_depth.{p}": f for p, f in self.min_depth.items()})
        for name in ("memory_bandwidth", "memory", "weight_memory", "power", "runtime_overhead", "train_overhead",
                     "run_overhead", "kernel_overhead"):
            figure = getattr(self, name)
            if figure is not None:
                out[name] = figure
        return out


def _explain(where: str, name: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"] if p != "[key]"]
    message = first["msg"].removeprefix("Value error, ")
    field = ".".join(loc)
    bracketed = re.match(r"\[(\w+)\] (.*)", message)  # a model-level check names its field itself
    if bracketed:
        field, message = bracketed.groups()
    if first["type"] == "extra_forbidden":
        message = "is not a device field (see the header of devices.yaml for the fields)"
    elif first["type"] == "missing":
        message = "is missing"
    else:
        got = first.get("input")
        if not isinstance(got, (dict, list)) and first["type"] not in ("value_error",):
            message = f"{message} (got {got!r})"
    return f"device file {where}: entry {name!r}, field {field or '(entry)'}: {message}"


def parse_devices(tree: Any, where: str) -> dict[str, Device]:
    """{"devices": {name: fields}} -> {name: Device}; UserError naming the entry and field of the first problem."""
    if not isinstance(tree, dict) or not isinstance(tree.get("devices"), dict):
        raise UserError(f"device file {where} must hold a mapping `devices:` of device names to their fields")
    out = {}
    for name, fields in tree["devices"].items():
        if name == "host":
            raise UserError(f"device file {where}: the name 'host' is this machine, measured by `tandem plan`; give "
                            "your entry another name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UserError(f"device file {where}: entry {name!r}: names are lowercase letters, digits, '.', '_', '-'")
        if not isinstance(fields, dict):
            raise UserError(f"device file {where}: entry {name!r} must be a mapping of fields")
        if "name" in fields:
            raise UserError(f"device file {where}: entry {name!r}, field name: the entry's key is its name; remove it")
        try:
            out[name] = Device.model_validate({**fields, "name": name})
        except ValidationError as err:
            raise UserError(_explain(where, name, err)) from None
    return out


def load_devices(extra: str | Path | None = None) -> dict[str, Device]:
    """The built-in profiles, then those of `extra` (a YAML file of the same layout), which add or replace."""
    from tandem.config import read_yaml_mapping

    devices = parse_devices(read_yaml_mapping(BUILTIN, "device file", "reinstall tandem"), BUILTIN.name)
    if extra is not None:
        devices.update(parse_devices(read_yaml_mapping(extra, "device file", "give a YAML file of device profiles"),
                                     str(extra)))
    return devices


def select(devices: dict[str, Device], names: list[str] | None) -> list[Device]:
    """The devices named (a comma list or 'all'), in the order given; UserError for an unknown name."""
    if not names or names == ["all"]:
        return list(devices.values())
    wanted = [n.strip() for item in names for n in item.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in devices and n != "all"]
    if unknown:
        raise UserError(f"unknown device {unknown[0]!r}; choose from host (this machine), {', '.join(devices)} or all "
                        "(add your own with --devices FILE)")
    if "all" in wanted:
        return list(devices.values())
    return [devices[n] for n in dict.fromkeys(wanted)]
