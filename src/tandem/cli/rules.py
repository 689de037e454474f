"""`tandem rules`: hierarchical IF-THEN rules over part concepts the network uses.

    tandem rules BUNDLE [--max-leaves 32] [--concepts K] [--groups G] [--layer T] [--json] [--out DIR]   fit, store
    tandem rules BUNDLE --show [--json]                                   the stored rules
    tandem rules BUNDLE --explain IMAGE... [--out DIR] [--json]           each image's path, with pictures

The work is in tandem.explain (fit_rules, rules); --show and --explain are torch-free and scikit-learn-free.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tandem.cli.args import counted, print_json
from tandem.errors import UserError

EXPLAINED = "rules-explained"  # --explain's pictures go here unless --out says where

RULES_EXAMPLES = f"""examples:
  tandem rules bundles/animals/1                      fit part concepts and a two-level tree, store them, print them
  tandem rules bundles/animals/1 --max-leaves 16      a smaller tree (its fidelity is printed with it)
  tandem rules bundles/animals/1 --json --out report  JSON on stdout; rules.txt, report.json, concept PNGs in report/
  tandem rules bundles/animals/1 --show               the stored rules, without fitting (torch-free)
  tandem rules bundles/animals/1 --explain cat.png photos/   why each image got its label, with a picture each

Concepts are parts: non-negative factorisation (NMF) of a spatial layer's activations at every position of every
training image (by default the last block's output; --layer picks another), so a concept is something that fires
at a place and is shared by the classes that have it. Each is shown by the image regions where it fires most
(concepts/concept_K.png) and named after where it fires and on which classes. Classes are grouped by the concepts
they use; the first level of the tree tells the groups apart, the second the classes within a group, and an
explanation is the path: the group and why, then the class and why, each condition with its value for the image.
Fidelity: how often the rules agree with the network on the test split; accuracy: with the truth. The report also
says how many concepts are class detectors again, how many explanations are circular (every condition a concept
of the answer's class only) or contradictory (always 0). Fitting needs the bundle's training data and
scikit-learn (pip install 'tandem[explain]'); --show and --explain need neither (nor torch). --explain writes
NAME.rules.png (where each concept on the path fired, orange) into --out (default ./{EXPLAINED}).
Storing adds rules.json and concepts/ to the bundle and its manifest (a second run replaces them); a signed
bundle needs --sign KEY.pem to be signed again, a read-only one --no-store."""


def register(sub) -> None:
    """Add `rules` to the `tandem` command's subparsers."""
    from tandem.explain.rules import SCHEMA

    p = sub.add_parser("rules", help="hierarchical IF-THEN rules over part concepts the network uses, with fidelity",
                       description="Extract rules from a bundle's network: part concepts in a spatial layer (each "
                                   "shown by the regions where it fires), classes grouped by the concepts they share, "
                                   "a two-level tree (group, then class) over the network's own predictions, its "
                                   "fidelity and its measures of purpose on the test split; store them in the bundle "
                                   "(rules.json, hashed like every file). Or apply stored rules: --explain.",
                       epilog=RULES_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (from `tandem export`)")
    p.add_argument("--max-leaves", type=counted(2, 4096), default=None, metavar="N",
                   help="at most N rules (leaves of the whole tree) (default: 32)")
    p.add_argument("--concepts", type=counted(1, 1024), default=None, metavar="K",
                   help="number of part concepts (default: 24)")
    p.add_argument("--groups", type=counted(1, 1024), default=None, metavar="G",
                   help="groups of classes at the first level (default: about the square root of the classes; a "
                        "class is never a group alone)")
    p.add_argument("--layer", default=None, metavar="TENSOR",
                   help="the spatial activation to find concepts in (default: the last block's output; an unknown "
                        "name lists the ones there are)")
    p.add_argument("--out", metavar="DIR", help="fitting: also write the report there (rules.txt, report.json, "
                   f"concepts/*.png); --explain: where the pictures go (default ./{EXPLAINED})")
    p.add_argument("--force", action="store_true", help="replace a report or pictures already in --out")
    p.add_argument("--no-store", action="store_true", help="fit and print the rules, leave the bundle as it is")
    p.add_argument("--sign", metavar="KEY.pem", help="for a signed bundle: sign it again with this private key after "
                   "storing the rules (without it, a signed bundle is refused)")
    p.add_argument("--show", action="store_true", help="print the rules stored in the bundle instead of fitting")
    p.add_argument("--explain", nargs="+", metavar="IMAGE",
                   help="apply the stored rules to these image files or folders: each prediction's path, with a "
                        "picture of where each concept on it fired")
    p.add_argument("--json", action="store_true", help=f"print JSON (schema {SCHEMA}) instead of text")
    p.set_defaults(func=cmd_rules)


def cmd_rules(args) -> int:
    fitting = {"--max-leaves": args.max_leaves, "--concepts": args.concepts, "--groups": args.groups,
               "--layer": args.layer, "--no-store": args.no_store or None, "--sign": args.sign}
    if args.show or args.explain:
        given = [name for name, value in fitting.items() if value is not None]
        if args.show and (args.out is not None or args.force):
            given += [flag for flag, value in (("--out", args.out), ("--force", args.force or None)) if value]
        if args.show and args.explain:
            raise UserError("give --show or --explain, not both")
        if given:
            raise UserError(f"{', '.join(given)} fit new rules; --show and --explain use the stored ones: drop "
                            f"{'them' if len(given) > 1 else 'it'}")
        return _explain(args) if args.explain else _show(args)
    from tandem.explain.fit_rules import fit_rules
    from tandem.explain.rules_store import format_report

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    chosen = {"max_leaves": args.max_leaves, "concepts": args.concepts, "groups": args.groups, "layer": args.layer}
    report = fit_rules(args.bundle, **{k: v for k, v in chosen.items() if v is not None}, store=not args.no_store,
                       out=args.out, force=args.force, sign_key=args.sign, log=log)
    if args.json:
        print_json(report)
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
        print_json({"schema": rules.data["schema"], "bundle": str(args.bundle), **m, "concepts": len(rules.concepts),
                    "concept_list": rules.concepts, "groups_list": rules.groups, "rules": rules.text(),
                    "tree": rules.tree})
        return 0
    concepts = len(rules.concepts)
    print(f"rules stored in {args.bundle}: {concepts} concept{'' if concepts == 1 else 's'}, "
          f"{len(rules.groups)} groups, {m['leaves']} {'leaf' if m['leaves'] == 1 else 'leaves'}, depth {m['depth']}; "
          f"fidelity {m['fidelity']:.1%} on {m['test_images']} test images, accuracy {m['accuracy']:.1%}")
    print()
    print(rules.text())
    print()
    for c in rules.concepts:
        print(f"  concept {c['id']:<3} {c['name']:<36} {c['prototype']}")
    return 0


def _explain(args) -> int:
    from tandem.explain.explain_images import check_out, output_names
    from tandem.explain.rules_pictures import explanation_png
    from tandem.files import write_bytes_atomic
    from tandem.images import expand_paths

    rules = _stored(args.bundle)
    out = Path(args.out or EXPLAINED)
    files = expand_paths(args.explain)
    names = dict(zip(files, output_names(files)))
    check_out(out, list(names.values()), "rules", args.force)
    results, failed = [], 0
    if not args.json:
        print(f"rules of {args.bundle}: fidelity {rules.fidelity:.1%} (how often they agree with the network on its "
              "test split)")
    for path, pixels, why, error in rules.explain_decoded(files):
        if error is not None:
            failed += 1
            results.append({"path": str(path), "error": error})
            if not args.json:
                print(f"error: {error}", file=sys.stderr, flush=True)
            continue
        picture = out / f"{names[path]}.rules.png"
        out.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(picture, explanation_png(pixels, why))
        one = {"path": str(path), "picture": str(picture), **why}
        results.append(one)
        if not args.json:
            verdict = "agrees with the network" if one["agrees"] else f"the network says {one['network_label']}"
            print(f"{one['path']}: {one['text']}  [{verdict}]\n  picture: {picture}", flush=True)
    if args.json:
        print_json({"schema": rules.data["schema"], "bundle": str(args.bundle), "fidelity": rules.fidelity,
                    "images": results})
    if failed:
        print(f"error: {failed} file(s) could not be read; the others were explained", file=sys.stderr)
        return 1
    return 0
