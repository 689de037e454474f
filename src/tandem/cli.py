"""The `tandem` command. Each subcommand imports its part only when it runs, so `--help` is instant.

    tandem demo                               train, export, and classify held-out animals
    tandem train [CONFIG.yaml] [key=value ...] [--resume RUN]
    tandem export RUN --out BUNDLE [--sign KEY.pem]
    tandem predict BUNDLE PATH... [--top-k K] [--json] [--trusted-key PUBLIC.pem]
    tandem config                             every config key with its default
    tandem keygen KEY.pem PUBLIC.pem          a key pair for signed bundles
"""

from __future__ import annotations

import argparse
import json
import os
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def _log_for(args):
    """With --json, stdout carries only the JSON: logs go to stderr."""
    return (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print


def cmd_train(args) -> int:
    from tandem.config import load_config

    config_file = None
    overrides = list(args.settings)
    if overrides and "=" not in overrides[0]:
        config_file = overrides.pop(0)
    if args.resume:
        from tandem.train.runs import resume_config

        if config_file:
            raise UserError("--resume takes its config from the run folder; give key=value overrides only")
        cfg = resume_config(args.resume, overrides)
    else:
        cfg = load_config(config_file, overrides)
    from tandem.train.loop import train

    result = train(cfg, resume=bool(args.resume), log=_log_for(args))
    if args.json:
        _print_json({**result.metrics, "run_dir": str(result.run_dir)})
    return 0


def cmd_export(args) -> int:
    from tandem.export.onnx_bundle import export_bundle

    out = export_bundle(args.run, args.out, name=args.name, version=args.version, atol=args.atol,
                        exporter=args.exporter, force=args.force, sign=args.sign, log=_log_for(args))
    if args.json:
        from tandem.bundle import read_manifest

        manifest = read_manifest(out, verify=False)
        _print_json({"bundle": str(out), "metrics": manifest["metrics"], **manifest["export"]})
    else:
        print(f"predict with:  tandem predict {out} IMAGE_OR_FOLDER")
    return 0


def cmd_predict(args) -> int:
    from tandem.runtime import Predictor

    predictor = Predictor.load(args.bundle, threads=args.threads, trusted_key=args.trusted_key)
    failed = 0
    # Results stream in input order as soon as they are decoded; one bad file does not stop the rest.
    for path, preds, error in predictor.predict_files(args.paths, k=args.top_k, workers=args.workers):
        if error is not None:
            failed += 1
            if args.json:
                print(json.dumps({"path": str(path), "error": error}), flush=True)
            else:
                print(f"error: {error}", file=sys.stderr, flush=True)
            continue
        if args.json:
            top = [{"label": p.label, "index": p.index, "probability": p.probability} for p in preds]
            print(json.dumps({"path": str(path), "top_k": top}), flush=True)
        else:
            print(f"{path}: " + "  ".join(f"{p.label} {p.probability:.1%}" for p in preds), flush=True)
    if failed:
        print(f"error: {failed} file(s) could not be read; the others were classified", file=sys.stderr)
        return 1
    return 0


def cmd_keygen(args) -> int:
    from tandem.bundle import generate_signing_key

    generate_signing_key(args.private, args.public)
    print(f"private key {args.private} (keep it secret; sign with `tandem export RUN --out B --sign {args.private}`)")
    print(f"public key  {args.public} (share it; verify with `tandem predict B IMAGES --trusted-key {args.public}`)")
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
                              "tandem train --resume runs/latest.  `tandem config` lists every key. Each run "
                              "gets its own folder runs/<date>-<time> (runs/latest links to the newest) unless "
                              "out_dir=... names one.")
    p.add_argument("settings", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="an optional YAML config file, then dotted overrides such as optim.lr=0.01")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its newest good checkpoint; "
                   "overrides may change only progress, checkpoint_every, keep_checkpoints and device")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout (logs go to stderr)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a trained run to a bundle (ONNX, safetensors, manifest)",
                       description="Export a run folder (its best checkpoint by validation accuracy) or one "
                                   "checkpoint folder to a bundle. Fails, writing nothing, if ONNX Runtime and torch "
                                   "disagree. The bundle's test accuracy is measured with ONNX Runtime.")
    p.add_argument("run", help="run folder (train out_dir) or a checkpoint folder inside it")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--name", help="model name in the manifest (default: <data>-<model>)")
    p.add_argument("--version", type=int, default=1, help="model version in the manifest (default: 1)")
    p.add_argument("--atol", type=_positive_float, default=1e-4, help="parity tolerance, max abs logit difference (default: 1e-4)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx exporter (default: torchscript, much faster for these models)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds a bundle (never another folder)")
    p.add_argument("--sign", metavar="KEY.pem", help="sign the bundle with this private key (see `tandem keygen`)")
    p.add_argument("--json", action="store_true", help="print the bundle path, metrics and parity result as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="classify images with a bundle (torch-free)",
                       description="Classify image files and folders (searched recursively) with a bundle. "
                                   "Verifies the bundle's hashes first. Never imports torch.")
    p.add_argument("bundle", help="bundle folder (from `tandem export`)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--top-k", type=_positive_int, default=1, help="how many classes to report per image (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="processes decoding images (default: one per core)")
    p.add_argument("--trusted-key", metavar="PUBLIC.pem",
                   help="refuse the bundle unless its signature verifies under this public key")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line (JSON Lines): {path, top_k} or {path, error}")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("keygen", help="make a key pair for signing bundles",
                       description="Write an EC P-256 key pair as PEM files: the private one signs bundles "
                                   "(`tandem export --sign`), the public one verifies them (`--trusted-key`).")
    p.add_argument("private", help="private key file to write (mode 0600)")
    p.add_argument("public", help="public key file to write")
    p.set_defaults(func=cmd_keygen)

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
    except BrokenPipeError:  # `tandem predict ... | head`: the reader has gone, which is no error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
