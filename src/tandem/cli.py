"""The `tandem` command. Each subcommand imports its part only when it runs, so `--help` is instant.

    tandem demo                               train, export, and classify held-out animals
    tandem train [CONFIG.yaml] [key=value ...] [--resume RUN]
    tandem export RUN --out BUNDLE
    tandem predict BUNDLE PATH... [--top-k K] [--json]
    tandem config                             every config key with its default
"""

from __future__ import annotations

import argparse
import json
import sys

from tandem import __version__
from tandem.errors import UserError


def _counted(low: int, high: int = 2**31 - 1):
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
_positive_int, _epochs, _seed = _counted(1), _counted(1, 10_000), _counted(0, 2**32 - 1)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def cmd_train(args) -> int:
    from tandem.config import load_config

    config_file = None
    overrides = list(args.settings)
    if overrides and "=" not in overrides[0]:
        config_file = overrides.pop(0)
    if args.resume:
        from pathlib import Path

        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume {args.resume}: no config.yaml there; give the out_dir of an earlier `tandem train`")
        if config_file:
            raise UserError("--resume takes its config from the run folder; give key=value overrides only")
        cfg = load_config(saved, overrides + [f"out_dir={args.resume}"])
    else:
        cfg = load_config(config_file, overrides)
    from tandem.train.loop import train

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    result = train(cfg, resume=bool(args.resume), log=log)
    if args.json:
        _print_json({**result.metrics, "run_dir": str(result.run_dir)})
    return 0


def cmd_export(args) -> int:
    from tandem.export.onnx_bundle import export_bundle

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    out = export_bundle(args.run, args.out, name=args.name, version=args.version, atol=args.atol,
                        exporter=args.exporter, force=args.force, log=log)
    if args.json:
        from tandem.bundle import read_manifest

        _print_json({"bundle": str(out), **read_manifest(out, verify=False)["export"]})
    else:
        print(f"predict with:  tandem predict {out} IMAGE_OR_FOLDER")
    return 0


def cmd_predict(args) -> int:
    from tandem.runtime import Predictor

    predictor = Predictor.load(args.bundle, threads=args.threads)
    results = predictor.predict_paths(args.paths, k=args.top_k)
    if args.json:
        _print_json([{"path": str(path), "top_k": [{"label": p.label, "index": p.index, "probability": p.probability}
                                                  for p in preds]} for path, preds in results])
        return 0
    for path, preds in results:
        guesses = "  ".join(f"{p.label} {p.probability:.1%}" for p in preds)
        print(f"{path}: {guesses}")
    return 0


def cmd_demo(args) -> int:
    from tandem.demo import run_demo

    report = run_demo(args.out, epochs=args.epochs, quiet=args.json, seed=args.seed, precision=args.precision)
    if args.json:
        _print_json(report)
    return 0


def cmd_config(args) -> int:
    from tandem.config import describe_keys, dump_config, load_config

    if args.settings:
        config_file = args.settings[0] if "=" not in args.settings[0] else None
        overrides = args.settings[1:] if config_file else args.settings
        print(dump_config(load_config(config_file, overrides)), end="")
        return 0
    rows = describe_keys()
    if args.json:
        _print_json([{"key": k, "default": d, "description": t} for k, d, t in rows])
        return 0
    for key, default, text in rows:
        print(f"{key:<24} {default!s:<14} {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem", description="Train a network (PyTorch), export it as a verified bundle, run it without torch.",
        epilog="Start with `tandem demo`. Each command has its own --help.")
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train on the embedded animals, export, classify 100 held-out images",
                       description="The whole path on the embedded animals: train the default cnn, export the "
                                   "bundle, then classify 100 held-out images in a separate torch-free process.")
    p.add_argument("--out", default="tandem-demo", help="folder for everything the demo writes (default: %(default)s)")
    p.add_argument("--epochs", type=_epochs, default=None, help="override the number of training epochs")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the split, the initial weights and the augmentation (default: %(default)s)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on GPUs and on CPUs with native bf16 (AMX, AVX512-BF16), else fp32")
    p.add_argument("--json", action="store_true", help="print report.json instead of the tables")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model from a config",
                       description="Train a model. With no arguments: the default cnn on the embedded animals.",
                       epilog="examples:  tandem train  |  tandem train run.yaml optim.lr=0.01  |  "
                              "tandem train data.source=photos/ data.channels=3 model.name=resnet  |  "
                              "tandem train --resume runs/latest.  `tandem config` lists every key.")
    p.add_argument("settings", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="an optional YAML config file, then dotted overrides such as optim.lr=0.01")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its newest good checkpoint")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout (logs go to stderr)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a trained run to a bundle (ONNX, safetensors, manifest)",
                       description="Export a run folder (its newest good checkpoint) or one checkpoint folder to a "
                                   "bundle. Fails, writing nothing, if ONNX Runtime and torch disagree.")
    p.add_argument("run", help="run folder (train out_dir) or a checkpoint folder inside it")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--name", help="model name in the manifest (default: <data>-<model>)")
    p.add_argument("--version", type=int, default=1, help="model version in the manifest (default: 1)")
    p.add_argument("--atol", type=float, default=1e-4, help="parity tolerance, max abs logit difference (default: 1e-4)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx exporter (default: torchscript, much faster for these models)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the bundle path and parity result as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="classify images with a bundle (torch-free)",
                       description="Classify image files and folders (searched recursively) with a bundle. "
                                   "Verifies the bundle's hashes first. Never imports torch.")
    p.add_argument("bundle", help="bundle folder (from `tandem export`)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--top-k", type=_positive_int, default=1, help="how many classes to report per image (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("config", help="list every config key with its default, or resolve a config",
                       description="With no arguments: every key, default and meaning. With [CONFIG.yaml] "
                                   "key=value...: the resolved, validated config as YAML.")
    p.add_argument("settings", nargs="*", metavar="[CONFIG.yaml] key=value")
    p.add_argument("--json", action="store_true", help="the key list as JSON")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name in ("torch", "onnx", "onnxscript", "safetensors", "matplotlib"):
            print(f"error: `tandem {args.command}` needs the training side ({err.name} is not installed); "
                  "install it with: pip install 'tandem[train]'", file=sys.stderr)
            return 2
        if err.name in ("onnxruntime", "PIL"):
            print(f"error: `tandem {args.command}` needs {err.name}; install it with: pip install 'tandem[infer]'",
                  file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
