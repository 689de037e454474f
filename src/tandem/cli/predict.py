"""`tandem predict`: classify image files with a bundle (torch-free)."""

from __future__ import annotations

import json
import sys

from tandem.cli.args import positive_int, threads, workers


def register(sub) -> None:
    p = sub.add_parser("predict", help="classify images with a bundle (torch-free)",
                       description="Classify image files and folders (searched recursively) with a bundle. "
                                   "Verifies the bundle's hashes first. Never imports torch.")
    p.add_argument("bundle", help="bundle folder (from `tandem export`)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--top-k", type=positive_int, default=1, help="how many classes to report per image (default: %(default)s)")
    p.add_argument("--threads", type=threads, default=None,
                   help="ONNX Runtime threads (default: the cores this process may use; OMP_NUM_THREADS wins)")
    p.add_argument("--streams", type=threads, default=1,
                   help="batches classified at once, each on threads/streams threads: more images per second on "
                        "big folders with small models (try the number of cores; `tandem bench` shows the best) "
                        "(default: %(default)s)")
    p.add_argument("--workers", type=workers, default=None,
                   help="processes decoding images (default: one per core)")
    p.add_argument("--trusted-key", metavar="PUBLIC.pem",
                   help="refuse the bundle unless its signature verifies under this public key")
    p.add_argument("--precision", choices=["auto", "fp32", "int8"], default="auto",
                   help="which model runs: auto (default) = int8 when the bundle has model.int8.onnx, else fp32")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line (JSON Lines): {path, top_k} or {path, error}")
    p.set_defaults(func=cmd_predict)


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
