"""`tandem demo`: train, export and classify held-out animals, end to end."""

from __future__ import annotations

from tandem.cli.args import epochs, print_json, seed


def register(sub) -> None:
    p = sub.add_parser("demo", help="train on the embedded animals, export, classify 100 held-out images",
                       description="The whole path on the embedded animals: train the default cnn, export the "
                                   "bundle, then classify 100 held-out images in a separate torch-free process.")
    p.add_argument("--out", default="tandem-demo", help="folder for everything the demo writes (default: %(default)s)")
    p.add_argument("--epochs", type=epochs, default=None, help="override the number of training epochs")
    p.add_argument("--seed", type=seed, default=0,
                   help="seed of the split, the initial weights and the augmentation (default: %(default)s)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on GPUs and on CPUs with native bf16 (AMX, AVX512-BF16), else fp32")
    p.add_argument("--verbose", action="store_true", help="also print the full training config (always in "
                   "OUT/run/config.yaml)")
    p.add_argument("--json", action="store_true", help="print report.json instead of the tables")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from tandem.demo import run_demo

    report = run_demo(args.out, epochs=args.epochs, quiet=args.json, seed=args.seed, precision=args.precision,
                      verbose=args.verbose)
    if args.json:
        print_json(report)
    return 0
