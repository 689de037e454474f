"""`tandem explain`: which pixels a prediction rests on, and how far each method can be trusted (`tandem rules`,
the hierarchical rules, is in cli/rules.py).

    tandem explain BUNDLE IMAGE... [--method ig|gradcam|occlusion] [--target LABEL] [--out DIR] [--json]
                                   [--baseline black|blur|mean] [--steps N] [--smooth N] [--layer NAME]
    tandem explain BUNDLE --evaluate [--methods ig,gradcam,occlusion] [--limit N] [--curve-steps N] [--json]

The work is in tandem.explain (explain_images, evaluate); occlusion is torch-free.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tandem.cli.args import LineProgress, counted, print_json
from tandem.errors import UserError
from tandem.explain.methods import METHODS, SCHEMA, TITLES

EXAMPLES = """examples:
  tandem explain bundles/animals/1 zebra.png                      Integrated Gradients (occlusion without torch)
  tandem explain bundles/animals/1 photos/ --method occlusion     every image in a folder, torch-free
  tandem explain bundles/animals/1 cat.png --target dog           why (not) a dog: explain another class
  tandem explain bundles/animals/1 cat.png --out why/ --json      a machine-readable report on stdout
  tandem explain bundles/animals/1 --evaluate                     faithfulness of every method on the test split
  tandem explain bundles/animals/1 --evaluate --methods ig,occlusion --limit 200 --json
  tandem explain bundles/animals/1 cat.png --baseline blur --steps 100 --smooth 16   IG from a blurred image, SmoothGrad
  tandem explain bundles/animals/1 cat.png --method gradcam --layer 13            Grad-CAM on another layer

Each image gets NAME.METHOD.png (the image and the map over it: red raises the class's probability, blue lowers
it), NAME.METHOD.npy (the raw map) and NAME.METHOD.json in --out. Every method explains the softmax probability
of the predicted class (or --target) against a black image. Existing files are never replaced without --force.

--evaluate removes pixels in the order of each method's map (deletion: set to black; insertion: put back into
a black image) and tracks the probability of the predicted class: a faithful map makes it fall fast (small
deletion AUC) and rise fast (large insertion AUC). Each method is compared with a random order on the same
images, and a method that does not beat it is reported as such. It is called faithful only when it also beats
two maps that ignore the model (pixel brightness, a Sobel edge map) on both curves under three fills (removed
pixels become black, the blurred image, or the mean image), and passes the randomisation check (Adebayo et al.
2018, Quantus's MPRT: its map must change once the network's weights are randomised, layer by layer from the
top). --json prints schema tandem.explain/1."""

def register(sub) -> None:
    """Add `explain` to the `tandem` command's subparsers."""
    p = sub.add_parser("explain", help="why the network answered as it did: attribution maps, and their faithfulness",
                       description="Explain a bundle's predictions with attribution maps (Integrated Gradients or "
                                   "Grad-CAM through Captum, or occlusion in the torch-free runtime), or measure "
                                   "how faithful each method is on the bundle's test split (--evaluate).",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (from `tandem export`)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders of images (searched recursively)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="ig (Integrated Gradients), gradcam or occlusion (default: ig where torch and captum are "
                        "installed, else occlusion)")
    p.add_argument("--target", metavar="LABEL", help="explain this class instead of the predicted one (a label, or "
                   "its index)")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the pictures, maps and JSON "
                   "files (default: explanations)")
    p.add_argument("--force", action="store_true", help="replace explanations already in --out")
    p.add_argument("--window", type=counted(1, 4096), default=None, metavar="PIXELS",
                   help="occlusion: side of the black square (default: image size / 7, 4 for 28 pixels)")
    p.add_argument("--stride", type=counted(1, 4096), default=None, metavar="PIXELS",
                   help="occlusion: step between squares (default: half the window)")
    p.add_argument("--baseline", default=None, metavar="black|blur|mean",
                   help="ig and occlusion: the reference image, black (raw 0, default), blur (the image under a "
                        "Gaussian blur, sigma = side / 10) or mean (the training split's mean image where the data "
                        "is reachable, else each image's mean value; the JSON says which)")
    p.add_argument("--steps", default=None, metavar="N",
                   help="ig: Integrated Gradients' steps (Captum's n_steps, default 50); the deletion and insertion "
                        "curves' steps of --evaluate are --curve-steps")
    p.add_argument("--smooth", default=None, metavar="N",
                   help="ig and gradcam: SmoothGrad (Captum's NoiseTunnel), the mean map over N noisy copies of the "
                        "image, noise sigma 15%% of the pixel range (default 0: off)")
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="gradcam: the module to weigh, a name from the model's named_modules() (default: the last "
                        "convolutional block; an unknown name lists the valid ones)")
    p.add_argument("--evaluate", action="store_true",
                   help="measure faithfulness (deletion and insertion curves against random and model-free "
                        "baselines under three fills, and the randomisation check) on the test split")
    p.add_argument("--methods", default=None, metavar="M,M,...",
                   help="with --evaluate: the methods to score (default: every method this install and model run)")
    p.add_argument("--limit", type=counted(1), default=None, metavar="N",
                   help="with --evaluate: a seeded sample of N test images (default: all of them)")
    p.add_argument("--curve-steps", type=counted(1, 1 << 20), default=None, metavar="N",
                   help="with --evaluate: steps of each deletion and insertion curve (default: the image's side, 28 "
                        "for the animals: one row's worth of pixels a step); not IG's --steps")
    p.add_argument("--randomisation-images", type=counted(0, 1 << 20), default=None, metavar="N",
                   help="with --evaluate: test images the randomisation check explains at every layer (default: 32; "
                        "0 skips the check, and then no method is called faithful)")
    p.add_argument("--seed", type=counted(0, 2**32 - 1), default=0,
                   help="with --evaluate: seed of the random order and of --limit's sample (default: %(default)s)")
    p.add_argument("--json", action="store_true", help=f"print a report as JSON (schema {SCHEMA})")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args) -> int:
    if args.evaluate:
        if args.images:
            raise UserError("--evaluate scores the methods on the bundle's test split; drop the images, or drop "
                            "--evaluate to explain them")
        if args.method or args.target:
            given = " and ".join(flag for flag, value in (("--method", args.method), ("--target", args.target)) if value)
            raise UserError(f"{given} do{'es' if ' and ' not in given else ''} not apply with --evaluate: choose "
                            "methods with --methods ig,gradcam,occlusion; each test image's predicted class is explained")
        if args.out is not None or args.force:
            raise UserError("--evaluate writes no files (it prints, or --json); drop --out and --force")
        return _evaluate(args)
    extra = [flag for flag, value in (("--methods", args.methods), ("--limit", args.limit),
                                      ("--curve-steps", args.curve_steps),
                                      ("--randomisation-images", args.randomisation_images)) if value is not None]
    if extra:
        raise UserError(f"{', '.join(extra)} {'apply' if len(extra) > 1 else 'applies'} only with --evaluate; add "
                        f"--evaluate, or drop {'them' if len(extra) > 1 else 'it'}")
    if not args.images:
        raise UserError(f"give images to explain (tandem explain {args.bundle} IMAGE_OR_FOLDER ...), or --evaluate "
                        "to measure faithfulness on the bundle's test split")
    return _explain_images(args)


def _explain_images(args) -> int:
    from tandem.explain.explain_images import ImageExplanations
    from tandem.explain.methods import default_method, require_torch_side

    note = None
    if args.method:
        method = args.method
        require_torch_side(method)
    else:
        method, note = default_method()
    if note:
        print(note, file=sys.stderr)
    options = _options(args)
    options.check([method])
    run = ImageExplanations(args.bundle, args.images, method, args.target, args.out or "explanations", args.force,
                            args.window, args.stride, options)
    out, kind = run.out, run.kind
    results: list[dict] = []
    failed = 0
    if not args.json:
        print(f"{'image':<32} {'prediction':<22} {'explained':<16} picture")
    for path, record, error in run.explain():
        if error is not None:
            failed += 1
            results.append({"image": str(path), "error": error})
            print(f"error: {error}", file=sys.stderr, flush=True)
            continue
        results.append(record)
        if not args.json:
            p = record["prediction"]
            print(f"{_short(path, 32):<32} {_short(p['label'], 14):<14} {p['probability']:>6.1%}  "
                  f"{_short(record['target']['label'], 16):<16} {out / record['files']['picture']}", flush=True)
    if args.json:
        print_json({"schema": SCHEMA, "kind": "images", "bundle": str(args.bundle), "model_file": "model.onnx",
                    "method": method, "note": note,
                    "out": str(out), "explained": len(results) - failed, "failed": failed, "images": results})
    elif results:
        print(f"{len(results) - failed} image(s) explained by {TITLES[method]} into {out}/ (NAME.{kind}.png, .npy, "
            ".json)")
    if failed:
        print(f"error: {failed} file(s) could not be read; the others were explained", file=sys.stderr)
        return 1
    return 0


def _short(value: Any, width: int) -> str:
    text = str(value)
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _options(args):
    """--baseline, --steps, --smooth and --layer, each bad value a one-line error."""
    from tandem.explain.options import AttributionOptions

    return AttributionOptions.parse(args.baseline, args.steps, args.smooth, args.layer)


def _evaluate(args) -> int:
    from tandem.explain.evaluate import evaluate_bundle
    from tandem.explain.evaluate_text import format_evaluation
    from tandem.explain.methods import parse_methods

    if args.methods is not None:
        methods, _ = parse_methods(args.methods)
    else:
        methods = None
    bar = None
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description:<30}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=True)
    window_methods = methods if methods is not None else list(METHODS)
    if (args.window or args.stride) and "occlusion" not in window_methods:
        raise UserError("--window and --stride set occlusion's square; add occlusion to --methods, or drop them")
    options = _options(args)
    options.check(window_methods)
    settings = {"options": options, "randomisation_images": args.randomisation_images}
    if bar:
        with bar:
            report = evaluate_bundle(args.bundle, methods, args.limit, args.curve_steps, args.seed, args.window,
                                     args.stride, bar, **settings)
    else:  # off a terminal: a line every few seconds instead of a bar
        report = evaluate_bundle(args.bundle, methods, args.limit, args.curve_steps, args.seed, args.window,
                                 args.stride, LineProgress("explain --evaluate"), **settings)
    if args.json:
        print_json(report)
    else:
        print(format_evaluation(report))
    return 0
