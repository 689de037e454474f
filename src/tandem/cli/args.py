"""What every `tandem` command shares: argument types (each refusal one line), the one-line-error parser, and
output helpers. Light on purpose: the parser is built from these on every run, `--help` included."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def counted(low: int, high: int = 2**31 - 1):
    """An argument type: a whole number from low to high."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range; give a number from {low} to {high}")
        return value
    return parse


# The same ranges as the config's epochs and seed.
positive_int, epochs, seed = counted(1), counted(1, 10_000), counted(0, 2**32 - 1)
# Threads and processes: a mistyped 100000 would otherwise start that many and take the machine down.
threads, workers = counted(1, 256), counted(1, 64)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def non_negative_float(text: str) -> float:
    """Percentage points from 0 to 100."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value <= 100:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is out of range; give percentage points from 0 to 100")
    return value


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of whole numbers (e.g. 16,64,256)") from None
    if not sizes or min(sizes) < 1 or max(sizes) > 65536:
        raise argparse.ArgumentTypeError(f"'{text}': give batch sizes from 1 to 65536, e.g. 16,64,256")
    return sizes


def reuse(text: str) -> int | str:
    if text == "auto":
        return text
    value = counted(1, 4096)(text) if text.lstrip("-").isdigit() else None
    if value is None:
        raise argparse.ArgumentTypeError(f"'{text}': give auto or a whole number from 1 to 4096")
    return value


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def log_for(args):
    """With --json, stdout carries only the JSON: logs go to stderr."""
    return (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print


def rank_prefix() -> str:
    """'rank 1: ' inside a multi-process job (torchrun), so every error says which process it came from."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f"rank {rank}: " if world not in ("", "0", "1") else ""


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line: what was wrong and where --help is; exit 2.
    Subcommands' parsers are of this class too (add_subparsers makes them of the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class LineProgress:
    """Off a terminal (logs, CI), what a rich Progress shows: the calls the library makes on one (add_task,
    advance, remove_task) become a line on stderr when a task starts, at most one every `every` seconds while it
    advances, and one when it completes, so a long run shows it is alive."""

    def __init__(self, prefix: str, every: float = 5.0, clock=time.monotonic):
        self.prefix, self.every, self.clock = prefix, every, clock
        self.tasks: dict[int, list] = {}  # task -> [description, total, completed]
        self.last = clock()

    def add_task(self, description: str, total: int | None = None, **_) -> int:
        task = len(self.tasks)
        self.tasks[task] = [description, total, 0]
        self._say(task)
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        entry = self.tasks[task]
        entry[2] += advance
        if self.clock() - self.last >= self.every or (entry[1] is not None and entry[2] >= entry[1]):
            self._say(task)

    def remove_task(self, task: int) -> None:
        self.tasks.pop(task, None)

    def _say(self, task: int) -> None:
        description, total, done = self.tasks[task]
        count = "" if total is None else f" {done:g}/{total}"
        end = "" if total is not None and done >= total else " ..."
        print(f"{self.prefix}: {description}{count}{end}", file=sys.stderr, flush=True)
        self.last = self.clock()
