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
# Threads and processes: a mistyped 100000 would otherwise start that many and take the machine down.
_threads, _workers = _counted(1, 256), _counted(1, 64)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value <= 100:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is out of range; give percentage points from 0 to 100")
    return value


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of whole numbers (e.g. 16,64,256)") from None
    if not sizes or min(sizes) < 1 or max(sizes) > 65536:
        raise argparse.ArgumentTypeError(f"'{text}': give batch sizes from 1 to 65536, e.g. 16,64,256")
    return sizes


def _reuse(text: str) -> int | str:
    if text == "auto":
        return text
    value = _counted(1, 4096)(text) if text.lstrip("-").isdigit() else None
    if value is None:
        raise argparse.ArgumentTypeError(f"'{text}': give auto or a whole number from 1 to 4096")
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
    resume = args.resume
    if args.resume:
        from tandem.train.runs import resume_config

        if config_file:
            raise UserError("--resume takes its config from the run folder; give key=value overrides only")
        cfg = resume_config(args.resume, overrides)
    else:
        cfg = load_config(config_file, overrides)
        if _restarted():
            # torchrun --max-restarts started this process again after a rank failed: continue the run
            # in out_dir from its newest checkpoint instead of refusing the folder the first attempt made.
            from tandem.train.runs import resume_config, started_by_this_job

            if not cfg.out_dir:
                raise UserError("torchrun restarted the job, but out_dir is not set, so there is no run to continue; "
                                "give out_dir=... to jobs started with --max-restarts")
            if started_by_this_job(cfg.out_dir):  # not a folder some other run had filled before this job
                resume = cfg.out_dir
                cfg = resume_config(cfg.out_dir, [])  # the same command: the run's own config
    from tandem.train.loop import train

    result = train(cfg, resume=bool(resume), log=_log_for(args))
    if args.json and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        _print_json({**result.metrics, "run_dir": str(result.run_dir)})
    return 0


def _restarted() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def _rank_prefix() -> str:
    """'rank 1: ' inside a multi-process job (torchrun), so every error says which process it came from."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f"rank {rank}: " if world not in ("", "0", "1") else ""


def _next_version(args) -> tuple[str, int]:
    """--repo REPO --name NAME: the folder and number of NAME's next version."""
    from pathlib import Path

    from tandem.serve.config import check_model_name

    if args.out:
        raise UserError("give either --out BUNDLE or --repo REPO --name NAME, not both")
    if not args.name:
        raise UserError("--repo needs --name NAME: the model's folder in the repository")
    check_model_name(args.name)
    folder = Path(args.repo) / args.name
    while True:  # the number is taken by making its folder: two exports at once get two versions
        taken = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
        version = max(taken, default=0) + 1
        try:
            (folder / str(version)).mkdir(parents=True)
        except FileExistsError:
            continue
        return str(folder / str(version)), version


def cmd_export(args) -> int:
    from pathlib import Path

    from tandem.export.onnx_bundle import export_bundle

    out, version = args.out, args.version
    if args.repo:
        out, version = _next_version(args)
    elif not out:
        raise UserError("give --out BUNDLE (a folder), or --repo REPO --name NAME to add a version to a model repository")
    if not args.int8 and (args.int8_budget is not None or args.calibration is not None):
        raise UserError("--int8-budget and --calibration apply to int8 export: add --int8")
    if not args.fpga and (args.fpga_precision != "auto" or args.fpga_reuse != "auto"):
        raise UserError("--fpga-precision and --fpga-reuse apply to the FPGA export: add --fpga")
    try:
        out = export_bundle(args.run, out, name=args.name, version=version, atol=args.atol,
                            exporter=args.exporter, force=args.force, sign=args.sign, log=_log_for(args),
                            int8=args.int8, int8_budget_pp=args.int8_budget, calibration=args.calibration,
                            fpga=args.fpga, fpga_precision=args.fpga_precision, fpga_reuse=args.fpga_reuse)
    except BaseException:
        if args.repo and not any(Path(out).iterdir()):
            Path(out).rmdir()  # the version number reserved for this export is free again
            if not any(Path(out).parent.iterdir()):
                Path(out).parent.rmdir()  # and a model folder this export made is gone again
        raise
    if args.repo:
        from tandem.bundle import read_manifest
        from tandem.serve.triton import CONFIG_FILE, is_tandem_config, write_triton_config

        config = Path(args.repo) / args.name / CONFIG_FILE
        if not config.exists():
            write_triton_config(args.repo, args.name, read_manifest(out, verify=False))
            kept = f"{config} written for Triton"
        elif is_tandem_config(config):  # it may carry the serve settings: rewriting it is asked for explicitly
            kept = (f"{config} kept; rewrite it from your serve settings with `tandem serve {args.repo} --config "
                    "serve.yaml --write-triton-config`")
        else:
            kept = f"your own {config} left as it is"
        _log_for(args)(f"model repository {args.repo}: {args.name} version {version} ({kept}); a running "
                       f"server picks it up on POST /v2/repository/models/{args.name}/load")
    if args.json:
        from tandem.bundle import read_manifest

        manifest = read_manifest(out, verify=False)
        _print_json({"bundle": str(out), "metrics": manifest["metrics"], **manifest["export"]})
    else:
        print(f"predict with:  tandem predict {out} IMAGE_OR_FOLDER")
    return 0


def cmd_predict(args) -> int:
    from tandem.runtime import Predictor

    predictor = Predictor.load(args.bundle, threads=args.threads, trusted_key=args.trusted_key, precision=args.precision,
                               streams=args.streams)
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


def cmd_bench(args) -> int:
    from tandem.hardware.bench import format_report, run_bench

    def progress(message: str) -> None:
        print(f"bench: {message} ...", file=sys.stderr, flush=True)

    precisions = None if args.precision == "all" else [args.precision]
    report = run_bench(args.bundle, precisions, threads=args.threads, seconds=args.seconds, queries=args.queries,
                       batches=args.batches, rounds=args.rounds, starts=args.starts, progress=progress)
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
    return 0


def cmd_serve(args) -> int:
    from tandem.serve.config import describe_serve_keys, load_serve_config

    if args.help_config:
        for key, default, text in describe_serve_keys():
            print(f"{key:<32} {default!s:<30} {text}")
        return 0
    if not args.repo:
        raise UserError("give the model repository: tandem serve REPO (folders REPO/<model>/<version>/)")
    config = load_serve_config(args.config, {"host": args.host, "port": args.port})
    if args.store is not None and not args.store.strip():
        raise UserError("--store is empty; give a SQLite file path or postgresql://user@host:port/db")
    if args.store:
        config = config.model_copy(update={"store": config.store.model_copy(update={"url": args.store})})
    if args.write_triton_config:
        from tandem.bundle import read_manifest
        from tandem.serve.repository import Repository
        from tandem.serve.triton import write_triton_config

        repository = Repository(args.repo, config)
        for name in repository.names_on_disk():
            repository.wanted_versions(name)  # the versions the policy names exist
            latest = repository.wanted_versions(name, "all")[-1]
            batching = config.batching_for(name)
            path = write_triton_config(args.repo, name, read_manifest(f"{args.repo}/{name}/{latest}", verify=False),
                                       max_batch_size=batching.max_batch_size, dynamic_batching=batching.enabled,
                                       max_queue_delay_ms=batching.max_queue_delay_ms,
                                       versions=config.model(name).versions, force=args.force)
            print(f"wrote {path}")
        return 0
    from tandem.serve.app import serve

    serve(args.repo, config)
    return 0


def cmd_client(args) -> int:
    from tandem.serve.client import run_client

    return run_client(args.url, args.images, model=args.model, version=args.version, top_k=args.top_k,
                      token=args.token, as_json=args.json, feedback_label=args.feedback, timeout=args.timeout)


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


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line: what was wrong and where --help is; exit 2.
    Subcommands' parsers are of this class too (add_subparsers makes them of the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
                              "tandem train --resume runs/latest  |  torchrun --nproc-per-node 2 -m tandem train "
                              "parallel.strategy=ddp (or local-sgd, tensor, pipeline).  `tandem config` lists every "
                              "key. Each run "
                              "gets its own folder runs/<date>-<time> (runs/latest links to the newest) unless "
                              "out_dir=... names one.")
    p.add_argument("settings", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="an optional YAML config file, then dotted overrides such as optim.lr=0.01")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its newest good checkpoint "
                   "(under torchrun: the same process count and strategy); overrides may change only progress, "
                   "checkpoint_every, keep_checkpoints, device, compile, data.workers, data.stream and parallel.timeout")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout (logs go to stderr)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a trained run to a bundle (ONNX, safetensors, manifest)",
                       description="Export a run folder (its best checkpoint by validation accuracy) or one "
                                   "checkpoint folder to a bundle. Fails, writing nothing, if ONNX Runtime and torch "
                                   "disagree. The bundle's test accuracy is measured with ONNX Runtime.")
    p.add_argument("run", help="run folder (train out_dir) or a checkpoint folder inside it")
    p.add_argument("--out", help="bundle folder to write")
    p.add_argument("--repo", metavar="REPO", help="instead of --out: add the next version of --name to this model "
                   "repository (REPO/NAME/<n>/, and REPO/NAME/config.pbtxt for Triton)")
    p.add_argument("--name", help="model name (default: <data>-<model>; with --repo, the model's folder)")
    p.add_argument("--version", type=_positive_int, default=1, help="model version in the manifest (default: 1; "
                   "with --repo, the next free number)")
    p.add_argument("--atol", type=_positive_float, default=1e-4, help="parity tolerance, max abs logit difference (default: 1e-4)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx exporter (default: torchscript, much faster for these models)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds a bundle (never another folder)")
    p.add_argument("--sign", metavar="KEY.pem", help="sign the bundle with this private key (see `tandem keygen`)")
    p.add_argument("--fpga", action="store_true", help="also write fpga/: an hls4ml HLS project for the Kria KV260, "
                   "its fixed-point C++ emulation checked against the float model, report.json (needs the fpga extra "
                   "and g++; model.name=cnn-fpga is sized for it)")
    p.add_argument("--fpga-precision", default="auto", metavar="auto|ap_fixed<W,I>",
                   help="fixed-point type: auto picks the narrowest that agrees with the float model on >= 99%% of "
                        "validation images (default: %(default)s)")
    p.add_argument("--fpga-reuse", default="auto", type=_reuse, metavar="auto|N",
                   help="hls4ml reuse factor: multiplications per multiplier (default: %(default)s, balanced per layer "
                        "to fit the KV260's DSPs)")
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx (static int8, onnxruntime.quantization QDQ: per-channel int8 "
                        "weights, uint8 activations), kept only if it passes two gates, recorded in the manifest: "
                        "validation accuracy within --int8-budget of fp32's, and faster than fp32 on this CPU")
    p.add_argument("--int8-budget", type=_non_negative_float, default=None, metavar="PP",
                   help="with --int8: the validation accuracy int8 may lose, in percentage points (default: 0.5)")
    p.add_argument("--calibration", type=_positive_int, default=None, metavar="N",
                   help="with --int8: training images to calibrate the activation ranges on (default: 512)")
    p.add_argument("--json", action="store_true", help="print the bundle path, metrics and parity result as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="classify images with a bundle (torch-free)",
                       description="Classify image files and folders (searched recursively) with a bundle. "
                                   "Verifies the bundle's hashes first. Never imports torch.")
    p.add_argument("bundle", help="bundle folder (from `tandem export`)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--top-k", type=_positive_int, default=1, help="how many classes to report per image (default: %(default)s)")
    p.add_argument("--threads", type=_threads, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--streams", type=_threads, default=1,
                   help="batches classified at once, each on threads/streams threads: more images per second on "
                        "big folders with small models (try the number of cores; `tandem bench` shows the best) "
                        "(default: %(default)s)")
    p.add_argument("--workers", type=_workers, default=None,
                   help="processes decoding images (default: one per core)")
    p.add_argument("--trusted-key", metavar="PUBLIC.pem",
                   help="refuse the bundle unless its signature verifies under this public key")
    p.add_argument("--precision", choices=["auto", "fp32", "int8"], default="auto",
                   help="which model runs: auto (default) = int8 when the bundle has model.int8.onnx, else fp32")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line (JSON Lines): {path, top_k} or {path, error}")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="benchmark a bundle on this machine: latency, throughput, memory (torch-free)",
                       description="MLPerf-style scenarios for each precision of a bundle (fp32, and int8 where it has "
                                   "model.int8.onnx), on the CPU and on ONNX Runtime's CUDA provider where installed: "
                                   "single-stream (batch-1 latency p50/p90/p99), offline (images/s at the best batch "
                                   "size), cold start (a fresh process to its first prediction) and its peak RSS. "
                                   "Precisions are timed in alternated rounds. Progress goes to stderr.",
                       epilog="--json prints one object of schema tandem.bench/1, documented in "
                              "src/tandem/hardware/bench.py and the README. Bounded: under 10 s for the demo bundle "
                              "(--seconds and --queries bound single-stream, --starts the fresh processes).")
    p.add_argument("bundle", help="bundle folder (from `tandem export`)")
    p.add_argument("--precision", choices=["all", "fp32", "int8"], default="all",
                   help="all (default): every precision the bundle has; int8 needs model.int8.onnx")
    p.add_argument("--threads", type=_threads, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--seconds", type=_positive_float, default=2.0,
                   help="single-stream: at most this many seconds per precision (default: %(default)s)")
    p.add_argument("--queries", type=_positive_int, default=2000,
                   help="single-stream: at most this many queries per precision (default: %(default)s)")
    p.add_argument("--batches", type=_batch_sizes, default=[16, 64, 256], metavar="B,B,...",
                   help="offline: batch sizes to try, the best counts (default: 16,64,256)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="alternated timing rounds (default: %(default)s)")
    p.add_argument("--starts", type=_counted(0, 100), default=3,
                   help="fresh processes for cold start and peak RSS, median (default: %(default)s; 0 skips them)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (schema tandem.bench/1)")
    p.set_defaults(func=cmd_bench)

    from tandem.hardware.commands import register  # inspect, plan (torch-free; plan --train imports the training side)

    register(sub)

    from tandem.explain.commands import register as register_explain  # explain (occlusion torch-free; ig, gradcam torch)
    from tandem.explain.rules_commands import register as register_rules  # rules (--show, --explain torch-free)

    register_explain(sub)
    register_rules(sub)

    p = sub.add_parser("serve", help="serve a model repository over HTTP (Open Inference Protocol v2)",
                       description="Serve REPO/<model>/<version>/ bundles over the Open Inference Protocol v2 "
                                   "(tritonclient, KServe clients, curl), with /v1/models/<m>/classify for encoded "
                                   "images, feedback, /metrics and a web page at /. Never imports torch.",
                       epilog="tokens come from the environment: TANDEM_TOKEN (inference; when set, inference needs "
                              "it) and TANDEM_ADMIN_TOKEN (load/unload models, read feedback). Every setting: "
                              "`tandem serve --help-config`.")
    p.add_argument("repo", nargs="?", help="the model repository: REPO/<model>/<version>/ bundle folders")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_counted(0, 65535), help="port (default 8000)")
    p.add_argument("--config", metavar="serve.yaml", help="serve settings (batching, versions, auth, store, limits)")
    p.add_argument("--store", metavar="URL", help="prediction and feedback store: a SQLite path or postgresql://... "
                   "(default: tandem-serve.sqlite here)")
    p.add_argument("--help-config", action="store_true", help="list every serve setting with its default, and exit")
    p.add_argument("--write-triton-config", action="store_true",
                   help="write REPO/<model>/config.pbtxt for Triton from the serve settings, and exit")
    p.add_argument("--force", action="store_true", help="with --write-triton-config: replace configs tandem did not write")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="classify images on a tandem server (what a device runs)",
                       description="Send image files (folders searched recursively) to a `tandem serve` server and "
                                   "print the top classes. Needs no torch, no ONNX Runtime.")
    p.add_argument("url", help="the server, e.g. http://192.168.1.5:8000 (http:// may be left out)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--model", help="model name (default: the server's only model)")
    p.add_argument("--version", type=_positive_int, help="model version (default: the latest)")
    p.add_argument("--top-k", type=_positive_int, default=1, help="classes per image (default: %(default)s)")
    p.add_argument("--token", help="inference token (default: $TANDEM_TOKEN)")
    p.add_argument("--feedback", metavar="LABEL", help="also send LABEL as the true label of every image")
    p.add_argument("--timeout", type=_positive_float, default=30.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="JSON Lines: {path, prediction_id, model, version, top_k}")
    p.set_defaults(func=cmd_client)

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
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `tandem explain B --method ig a.png`: argparse gives a `*` positional nothing once an option has come, so
        # images after options arrive here; they are images all the same. Anything else is a mistake.
        if getattr(args, "command", None) == "explain" and not any(e.startswith("-") for e in extra):
            args.images = [*args.images, *extra]
        else:
            prog = f"tandem {args.command}" if getattr(args, "command", None) else "tandem"
            parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see `{prog} --help`)\n")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as err:
        sys.stderr.write(f"error: {_rank_prefix()}{err}\n")  # one write: the ranks of a job share the stream
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


if __name__ == "__main__":
    raise SystemExit(main())
