"""Storing fitted rules: into the bundle (rules.json and concepts/, listed in its manifest, crash-safe) and into
an --out folder (rules.txt, report.json, the prototype strips); and the text `tandem rules` prints."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tandem.bundle import MANIFEST, SIGNATURE, read_manifest, sha256_bytes
from tandem.errors import UserError
from tandem.explain.rules import RULES_FILE
from tandem.files import write_bytes_atomic

OURS = re.compile(rf"{re.escape(RULES_FILE)}|concepts/concept_\d+\.png")  # the files a rules run stores

# --- storing ---------------------------------------------------------------------------------------------


def check_storable(bundle: Path, sign_key) -> None:
    """Before the work: refuse what storing would break or cannot do, saying what to run instead."""
    if not os.access(bundle, os.W_OK) or not os.access(bundle / MANIFEST, os.W_OK) or \
            ((bundle / "concepts").is_dir() and not os.access(bundle / "concepts", os.W_OK)):
        raise UserError(f"bundle {bundle} is read-only, so the rules cannot be stored in it; copy it "
                        f"(cp -r {bundle} COPY) and run `tandem rules COPY`, or add --no-store to only print them")
    if (bundle / SIGNATURE).exists() and sign_key is None:
        raise UserError(f"bundle {bundle} is signed ({SIGNATURE}); storing rules adds files and changes {MANIFEST}, "
                        "so the signature would no longer verify: add --sign KEY.pem to sign it again with your key, "
                        "or --no-store to only print the rules")
    if sign_key is not None:
        if not (bundle / SIGNATURE).exists():
            raise UserError(f"--sign: bundle {bundle} is not signed; sign bundles when exporting "
                            "(`tandem export ... --sign KEY`), or leave --sign out")
        from tandem.bundle import check_signing_key

        check_signing_key(sign_key)


def _write_manifest(bundle: Path, manifest: dict) -> None:
    """manifest.json replaced in one rename: a reader (or a crash) sees the old one or the new one."""
    manifest = {**manifest, "files": dict(sorted(manifest["files"].items()))}
    write_bytes_atomic(bundle / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def store_rules(bundle: Path, files: dict[str, bytes]) -> None:
    """Replace the previous rules (rules.json and concepts/concept_K.png, nothing else) with these files.

    Crash-safe: first a manifest without the old rules, then the new files, then the manifest listing them;
    at every moment the manifest lists only files that match it.
    """
    manifest = read_manifest(bundle, verify=False)
    old = [name for name in manifest["files"] if OURS.fullmatch(name)]
    try:
        if old:
            _write_manifest(bundle, {**manifest, "files": {k: v for k, v in manifest["files"].items() if k not in old}})
            for name in old:
                (bundle / name).unlink(missing_ok=True)
        (bundle / "concepts").mkdir(exist_ok=True)
        for name, data in files.items():
            write_bytes_atomic(bundle / name, data)
        listed = {k: v for k, v in manifest["files"].items() if k not in old}
        listed.update({name: {"sha256": sha256_bytes(data), "bytes": len(data)} for name, data in files.items()})
        _write_manifest(bundle, {**manifest, "files": listed})
    except OSError as err:
        raise UserError(f"cannot store the rules in bundle {bundle} ({err.strerror}: {err.filename}); the bundle "
                        "still verifies without them; free the space or fix the permissions and run again") from None


REPORT_FILES = ("rules.txt", "report.json")


def check_out_folder(out: Path, force: bool) -> None:
    """--out DIR: a folder that can be written, holding no earlier report unless --force replaces it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the report")
    earlier = [name for name in REPORT_FILES if (out / name).exists()]
    if earlier and not force:
        raise UserError(f"--out {out} already holds a report ({', '.join(earlier)}); give another folder, or --force "
                        "to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot make --out {out} ({err.strerror}); check the path and its permissions") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"cannot write into --out {out} (permission denied); give another folder")


def write_report(out: Path, files: dict[str, bytes], report: dict) -> Path:
    """--out DIR: the report as text and JSON, and the prototype strips (an earlier report's strips removed)."""
    try:
        (out / "concepts").mkdir(parents=True, exist_ok=True)
        for old in (out / "concepts").glob("concept_*.png"):
            if f"concepts/{old.name}" not in files:
                old.unlink()
        for name, data in files.items():
            if name != RULES_FILE:
                write_bytes_atomic(out / name, data)
        write_bytes_atomic(out / "rules.txt", (format_report(report) + "\n").encode())
        write_bytes_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    except OSError as err:
        raise UserError(f"cannot write the report to {out} ({err.strerror}); check the path and its "
                        "permissions") from None
    return out


def format_report(report: dict) -> str:
    """What `tandem rules` prints: how the rules were made, how faithful they are, whether they explain, the tree,
    the concepts."""
    def pct(x: float) -> str:
        return f"{x * 100:.1f}%"

    c, h, w = report["feature_shape"]
    agree = round(report["fidelity"] * report["test_images"])
    groups = report["groups_list"]
    lines = [
        f"rules for {report['bundle']}: {report['concepts']} part concept{'' if report['concepts'] == 1 else 's'} "
        f"(NMF of {report['feature_tensor']}, {c} channels at {h} x {w} positions); {len(groups)} group"
        f"{'' if len(groups) == 1 else 's'} of classes, then a tree of {report['leaves']} "
        f"{'leaf' if report['leaves'] == 1 else 'leaves'} ({report['levels']} level{'' if report['levels'] == 1 else 's'}"
        f", depth {report['depth']}), fit on the network's own predictions for {report['fit_images']:,} training images",
        f"fidelity {pct(report['fidelity'])}: the rules agree with the network on {agree} of {report['test_images']} "
        f"test images; accuracy {pct(report['accuracy'])} (the network's: {pct(report['network_accuracy'])})",
        "fidelity by tree size: " + ", ".join(f"{s['max_leaves']} leaves {pct(s['fidelity'])}"
                                              for s in report["fidelity_by_leaves"]),
        f"do they explain: {report['class_detectors']} of {report['concepts']} concepts are class detectors "
        f"(correlation > 0.8 with one class's logit), {report['specific_concepts']} are specific to one class; "
        f"{pct(report['circular_share'])} of the test explanations are circular (only concepts of the class they "
        f"give), {report['contradictory']} contradictory",
        "groups: " + "; ".join(g["name"] for g in groups),
        "", report["rules"], "", "concepts (each shown by the image regions where it fires most):"]
    folder = Path(report["out"]) if report.get("out") else Path(report["bundle"]) if report["stored"] else None
    for one in report["concept_list"]:
        tops = ", ".join(f"{k} {v:.0%}" for k, v in one["top_labels"].items())
        strip = f"  {folder / one['prototype']}" if folder else ""
        lines.append(f"  concept {one['id']:<3} {one['name']:<36} top regions from: {tops}{strip}")
    if report["stored"]:
        lines.append(f"stored in {report['bundle']}: {RULES_FILE} and {report['concepts']} prototype strips, listed "
                     f"in {MANIFEST}" + (" and signed again" if report.get("signed_again") else "") +
                     f"; explain images torch-free with `tandem rules {report['bundle']} --explain IMAGE...`")
    else:
        lines.append("not stored in the bundle (--no-store)")
    return "\n".join(lines)
