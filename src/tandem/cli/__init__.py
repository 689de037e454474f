"""The `tandem` command. Each subcommand imports its part only when it runs, so `--help` is instant.

    tandem demo                               train, export, and classify held-out animals
    tandem train [CONFIG.yaml] [key=value ...] [--resume RUN]
    tandem export RUN --out BUNDLE [--sign KEY.pem] [--int8] [--fpga]   or   --repo REPO --name NAME (the next version)
    tandem predict BUNDLE PATH... [--top-k K] [--json] [--trusted-key PUBLIC.pem] [--precision auto|fp32|int8]
    tandem bench BUNDLE [--json] [--threads N] [--precision all|fp32|int8]   MLPerf-style scenarios, torch-free
    tandem inspect BUNDLE [--json]            per layer: parameters, MACs, FLOPs, weight bytes, activations
    tandem plan BUNDLE [--device NAME,...] [--json]   which device it fits, how fast, at what energy
    tandem plan --train [CONFIG.yaml] [key=value ...] [--device ...]   could a device train it
    tandem explain BUNDLE IMAGE... [--method ig|gradcam|occlusion] [--out DIR]   heatmaps   or   --evaluate (faithfulness)
    tandem rules BUNDLE [--max-leaves N] [--json] [--out DIR]   or   --explain IMAGE...   IF-THEN rules, their fidelity
    tandem config                             every config key with its default
    tandem keygen KEY.pem PUBLIC.pem          a key pair for signed bundles
    tandem serve REPO [--port P] [--config serve.yaml]   the Open Inference Protocol server
    tandem client URL IMAGE... [--model M]    classify images on a server

One module per command group (train, export, predict, hardware, explain, rules, serve, demo), each adding its
sub-parsers with register(sub); shared argument types and output helpers are in tandem.cli.args.
"""

from __future__ import annotations

import argparse
import os
import sys

import tandem
from tandem.cli import demo, explain, export, hardware, predict, rules, serve, train
from tandem.cli.args import Parser, rank_prefix
from tandem.errors import UserError
from tandem.threads import apply_to_torch, choose

# The commands that compute with torch in this process (train chooses its threads from its config itself).
TORCH_COMMANDS = ("demo", "export", "explain", "rules")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tandem", description="Train a network (PyTorch), export it as a verified bundle, run it without torch.",
        epilog="Start with `tandem demo`. Each command has its own --help.")
    parser.add_argument("--version", action="version", version=f"tandem {tandem.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # In the order `tandem --help` lists them.
    demo.register(sub)
    train.register(sub)
    export.register(sub)
    predict.register(sub)
    hardware.register(sub)  # bench, inspect, plan (torch-free; plan --train imports the training side)
    explain.register(sub)   # explain (occlusion torch-free; ig, gradcam torch)
    rules.register(sub)     # rules (--show, --explain torch-free)
    serve.register(sub)
    serve.register_client(sub)
    export.register_keygen(sub)
    train.register_config(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if code == 0 and "torch.distributed" in sys.modules and "LOCAL_RANK" in os.environ \
            and "TORCHELASTIC_RUN_ID" in os.environ:
        # A worker of torchrun: gloo's threads outlive the process group, and C++'s exit-time destructors then
        # abort a process whose run succeeded ("terminate called without an active exception", exit -6), which
        # fails the whole job. Its files are already fsynced and renamed: leave once the output is flushed.
        # (A failed rank exits as usual: torchrun ends the job at the first exit, and the other ranks need the
        # time to print their own error.)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `tandem explain B --method ig a.png`: argparse gives a `*` positional nothing once an option has come, so
        # images after options arrive here; they are images all the same. Anything else is a mistake.
        # The same for `tandem train --json epochs=3`: settings after an option are settings.
        positional = {"explain": "images", "train": "settings", "config": "settings"}.get(getattr(args, "command", None))
        if positional and not any(e.startswith("-") for e in extra):
            setattr(args, positional, [*getattr(args, positional), *extra])
        else:
            prog = f"tandem {args.command}" if getattr(args, "command", None) else "tandem"
            parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see `{prog} --help`)\n")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.command in TORCH_COMMANDS:  # before torch is imported: OpenMP reads its settings once, at load
            apply_to_torch(choose("torch"))
        return args.func(args)
    except UserError as err:
        sys.stderr.write(f"error: {rank_prefix()}{err}\n")  # one write: the ranks of a job share the stream
        sys.stderr.flush()
        return 2
    except ModuleNotFoundError as err:
        if err.name in ("torch", "onnx", "onnxscript", "safetensors", "matplotlib"):
            print(f"error: `tandem {args.command}` needs the training side ({err.name} is not installed); "
                  "install it with: pip install 'tandem[train]'", file=sys.stderr)
            return 2
        if err.name in ("fastapi", "starlette", "uvicorn", "prometheus_client", "sqlalchemy", "psycopg", "multipart"):
            print(f"error: `tandem {args.command}` needs the server's packages ({err.name} is not installed); "
                  "install them with: pip install 'tandem[serve]'", file=sys.stderr)
            return 2
        if err.name in ("onnxruntime", "PIL"):
            print(f"error: `tandem {args.command}` needs {err.name}; install it with: pip install 'tandem[infer]'",
                  file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tandem predict ... | head`: the reader has gone, which is no error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 0
    except OSError as err:  # a folder that cannot be written (read-only, full disk): the user's to fix
        if err.filename is None:
            raise
        print(f"error: cannot write or read {err.filename} ({err.strerror}); check the path and its permissions",
              file=sys.stderr)
        return 2
