"""`tandem export` and `tandem keygen`."""

from __future__ import annotations

from tandem.cli.args import log_for, non_negative_float, positive_float, positive_int, print_json, reuse
from tandem.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("export", help="export a trained run to a bundle (ONNX, safetensors, manifest)",
                       description="Export a run folder (its best checkpoint by validation accuracy) or one "
                                   "checkpoint folder to a bundle. Fails, writing nothing, if ONNX Runtime and torch "
                                   "disagree. The bundle's test accuracy is measured with ONNX Runtime.")
    p.add_argument("run", help="run folder (train out_dir) or a checkpoint folder inside it")
    p.add_argument("--out", help="bundle folder to write")
    p.add_argument("--repo", metavar="REPO", help="instead of --out: add the next version of --name to this model "
                   "repository (REPO/NAME/<n>/, and REPO/NAME/config.pbtxt for Triton)")
    p.add_argument("--name", help="model name (default: <data>-<model>; with --repo, the model's folder)")
    p.add_argument("--version", type=positive_int, default=1, help="model version in the manifest (default: 1; "
                   "with --repo, the next free number)")
    p.add_argument("--atol", type=positive_float, default=1e-4, help="parity tolerance, max abs logit difference (default: 1e-4)")
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
    p.add_argument("--fpga-reuse", default="auto", type=reuse, metavar="auto|N",
                   help="hls4ml reuse factor: multiplications per multiplier (default: %(default)s, balanced per layer "
                        "to fit the KV260's DSPs)")
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx (static int8, onnxruntime.quantization QDQ: per-channel int8 "
                        "weights, uint8 activations), kept only if it passes two gates, recorded in the manifest: "
                        "validation accuracy within --int8-budget of fp32's, and faster than fp32 on this CPU")
    p.add_argument("--int8-budget", type=non_negative_float, default=None, metavar="PP",
                   help="with --int8: the validation accuracy int8 may lose, in percentage points (default: 0.5)")
    p.add_argument("--calibration", type=positive_int, default=None, metavar="N",
                   help="with --int8: training images to calibrate the activation ranges on (default: 512)")
    p.add_argument("--json", action="store_true", help="print the bundle path, metrics and parity result as JSON")
    p.set_defaults(func=cmd_export)


def register_keygen(sub) -> None:
    p = sub.add_parser("keygen", help="make a key pair for signing bundles",
                       description="Write an EC P-256 key pair as PEM files: the private one signs bundles "
                                   "(`tandem export --sign`), the public one verifies them (`--trusted-key`).")
    p.add_argument("private", help="private key file to write (mode 0600)")
    p.add_argument("public", help="public key file to write")
    p.set_defaults(func=cmd_keygen)


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
                            exporter=args.exporter, force=args.force, sign=args.sign, log=log_for(args),
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
        log_for(args)(f"model repository {args.repo}: {args.name} version {version} ({kept}); a running "
                       f"server picks it up on POST /v2/repository/models/{args.name}/load")
    if args.json:
        from tandem.bundle import read_manifest

        manifest = read_manifest(out, verify=False)
        print_json({"bundle": str(out), "metrics": manifest["metrics"], **manifest["export"]})
    else:
        print(f"predict with:  tandem predict {out} IMAGE_OR_FOLDER")
    return 0


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


def cmd_keygen(args) -> int:
    from tandem.bundle import generate_signing_key

    generate_signing_key(args.private, args.public)
    print(f"private key {args.private} (keep it secret; sign with `tandem export RUN --out B --sign {args.private}`)")
    print(f"public key  {args.public} (share it; verify with `tandem predict B IMAGES --trusted-key {args.public}`)")
    return 0
