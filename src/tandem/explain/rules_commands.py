"""`tandem rules`: extract IF-THEN rules over concepts from a bundle's network, store them in the bundle,
and explain predictions with them (torch-free).

    tandem rules BUNDLE [--max-leaves 32] [--concepts K] [--json] [--out DIR]    fit, store, print
    tandem rules BUNDLE --show [--json]                                          the stored rules
    tandem rules BUNDLE --explain IMAGE... [--json]                              each image's rule path

cli.py calls register(sub) with its subparsers; each handler takes the parsed args and returns an exit code.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from tandem.cli import _counted, _print_json  # the command line's own argument types
from tandem.errors import UserError

EXAMPLES = """examples:
  tandem rules bundles/animals/1                      fit concepts and a 32-leaf tree, store them, print the rules
  tandem rules bundles/animals/1 --max-leaves 12      a smaller tree (its fidelity is printed with it)
  tandem rules bundles/animals/1 --json --out report  JSON on stdout; rules.txt, report.json, concept PNGs in report/
  tandem rules bundles/animals/1 --show               the stored rules, without fitting (torch-free)
  tandem rules bundles/animals/1 --explain cat.png photos/   why each image got its label (torch-free)

Concepts are found by non-negative factorisation (NMF) of the part of the penultimate activation that the last
layer reads, and shown by their most activating training images (concepts/concept_K.png). A decision tree from
concept scores to the network's own predictions gives the rules. Fidelity: how often the rules agree with the
network on the test split; accuracy: how often they agree with the truth. Fitting needs the bundle's training
data and scikit-learn (pip install 'tandem[explain]'); --show and --explain need neither (nor torch).
Storing adds rules.json and concepts/ to the bundle and its manifest (a second run replaces them); a signed
bundle needs --sign KEY.pem to be signed again, a read-only one --no-store."""


def register(sub) -> None:
    """Add `rules` to the `tandem` command's subparsers."""
    p = sub.add_parser("rules", help="hierarchical IF-THEN rules over concepts the network uses, with their fidelity",
                       description="Extract rules from a bundle's network: concepts in its penultimate layer (each "
                                   "shown by prototype images), a shallow decision tree from concept scores to the "
                                   "network's predictions, its fidelity and accuracy on the test split; store them in "
                                   "the bundle (rules.json, hashed like every file). Or apply stored rules: --explain.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (from `tandem export`)")
    p.add_argument("--max-leaves", type=_counted(2, 4096), default=None, metavar="N",
                   help="at most N rules (leaves of the tree) (default: 32)")
    p.add_argument("--concepts", type=_counted(1, 1024), default=None, metavar="K",
                   help="number of concepts (default: 16, or 1.5 per class for more than 10 classes)")
    p.add_argument("--space", choices=["used", "all"], default=None,
                   help="find concepts in the part of the penultimate activation the last layer reads (used, "
                        "default: faithful rules) or in all of it (all: more varied concepts, lower fidelity)")
    p.add_argument("--out", metavar="DIR", help="also write the report there: rules.txt, report.json, concepts/*.png")
    p.add_argument("--force", action="store_true", help="with --out: replace a report already there")
    p.add_argument("--no-store", action="store_true", help="fit and print the rules, leave the bundle as it is")
    p.add_argument("--sign", metavar="KEY.pem", help="for a signed bundle: sign it again with this private key after "
                   "storing the rules (without it, a signed bundle is refused)")
    p.add_argument("--show", action="store_true", help="print the rules stored in the bundle instead of fitting")
    p.add_argument("--explain", nargs="+", metavar="IMAGE",
                   help="apply the stored rules to these image files or folders: the rule each prediction follows")
    p.add_argument("--json", action="store_true", help="print JSON (schema tandem.rules/1) instead of text")
    p.set_defaults(func=cmd_rules)


def cmd_rules(args) -> int:
    fitting = {"--max-leaves": args.max_leaves, "--concepts": args.concepts, "--space": args.space,
               "--out": args.out, "--force": args.force or None, "--no-store": args.no_store or None,
               "--sign": args.sign}
    if args.show or args.explain:
        given = [name for name, value in fitting.items() if value is not None]
        if args.show and args.explain:
            raise UserError("give --show or --explain, not both")
        if given:
            raise UserError(f"{', '.join(given)} fit new rules; --show and --explain use the stored ones: drop "
                            f"{'them' if len(given) > 1 else 'it'}")
        return _explain(args) if args.explain else _show(args)
    from tandem.explain.fit_rules import fit_rules, format_report

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    chosen = {"max_leaves": args.max_leaves, "concepts": args.concepts, "space": args.space}  # None: fit_rules' default
    report = fit_rules(args.bundle, **{k: v for k, v in chosen.items() if v is not None}, store=not args.no_store,
                       out=args.out, force=args.force, sign_key=args.sign, log=log)
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
    return 0


def _stored(bundle):
    from tandem.explain.rules import RuleSet

    rules = RuleSet.load(bundle)
    if rules is None:
        raise UserError(f"bundle {bundle} has no rules yet; fit them with `tandem rules {bundle}`")
    return rules


def _show(args) -> int:
    rules = _stored(args.bundle)
    m = rules.metrics
    if args.json:
        _print_json({"schema": rules.data["schema"], "bundle": str(args.bundle), **m, "concepts": len(rules.concepts),
                     "concept_list": rules.concepts, "rules": rules.text(), "tree": rules.tree})
        return 0
    print(f"rules stored in {args.bundle}: {len(rules.concepts)} concepts, {m['leaves']} leaves, depth {m['depth']}; "
          f"fidelity {m['fidelity']:.1%} on {m['test_images']} test images, accuracy {m['accuracy']:.1%}")
    print()
    print(rules.text())
    print()
    for c in rules.concepts:
        print(f"  concept {c['id']:<3} {c['name']:<28} {c['prototype']}")
    return 0


def _explain(args) -> int:
    from tandem.images import decode_file_batches, expand_paths

    rules = _stored(args.bundle)
    p = rules.predictor
    files = expand_paths(args.explain)
    results, failed = [], 0
    if not args.json:
        print(f"rules of {args.bundle}: fidelity {rules.fidelity:.1%} (how often they agree with the network on its "
              "test split)")
    chunks = decode_file_batches(files, p.image_size, p.channels, p.resize)
    try:
        for chunk in chunks:  # a folder of any size, as it is decoded; an unreadable file does not stop the rest
            good = [(path, pixels) for path, pixels, _ in chunk if pixels is not None]
            why = iter(rules.explain(np.stack([pixels for _, pixels in good]))) if good else iter(())
            for path, pixels, error in chunk:
                if pixels is None:
                    failed += 1
                    results.append({"path": str(path), "error": error})
                    if not args.json:
                        print(f"error: {error}", file=sys.stderr, flush=True)
                    continue
                one = {"path": str(path), **next(why)}
                results.append(one)
                if not args.json:
                    verdict = "agrees with the network" if one["agrees"] else f"the network says {one['network_label']}"
                    print(f"{one['path']}: {one['text']}  [{verdict}]", flush=True)
    finally:
        chunks.close()
    if args.json:
        _print_json({"schema": rules.data["schema"], "bundle": str(args.bundle), "fidelity": rules.fidelity,
                     "images": results})
    if failed:
        print(f"error: {failed} file(s) could not be read; the others were explained", file=sys.stderr)
        return 1
    return 0
