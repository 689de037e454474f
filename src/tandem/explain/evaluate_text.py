"""`tandem explain BUNDLE --evaluate` as text: against random (black fill), against every model-free baseline under
every fill, the randomisation check, and each method's verdict (the report of tandem.explain.evaluate)."""

from __future__ import annotations

from tandem.explain.methods import TITLES

_NAMES = {"random": "random order", "brightness": "pixel brightness", "edge": "edge map (Sobel)"}


def _title(name: str, report: dict) -> str:
    if name == "occlusion" and report.get("occlusion"):
        return f"{TITLES[name]} ({report['occlusion']['window']}/{report['occlusion']['stride']})"
    return TITLES.get(name, _NAMES.get(name, name))


def format_evaluation(report: dict) -> str:
    random = report["random"]
    lines = [f"faithfulness of {report['bundle']} on {report['images']} of its {report['test_images']} test images "
             f"(accuracy {report['accuracy']:.1%}): pixels removed to black / put back into black in "
             f"{report['steps']} step{'' if report['steps'] == 1 else 's'}, tracking the probability of the predicted class; random order seed "
             f"{report['seed']}", "",
             f"{'method':<22} {'deletion AUC':>12} {'x random':>9} {'insertion AUC':>13} {'x random':>9} "
             f"{'s/image':>8}  verdict",
             f"{'random order':<22} {random['deletion_auc']:>12.3f} {1:>8.2f}x {random['insertion_auc']:>13.3f} "
             f"{1:>8.2f}x {'':>8}  (the baseline)"]
    for name, m in report["methods"].items():
        title = _title(name, report)
        ratios = [f"{r:>8.2f}x" if r is not None else f"{'n/a':>9}" for r in (m["deletion_ratio"], m["insertion_ratio"])]
        lines.append(f"{title:<22} {m['deletion_auc']:>12.3f} {ratios[0]} {m['insertion_auc']:>13.3f} "
                     f"{ratios[1]} {m['seconds_per_image']:>8.3f}  "
                     f"{'beats random' if m['beats_random'] else m['verdict'].split(' (')[0]}")
    lines.append("")
    lines.append("deletion AUC: lower is more faithful; insertion AUC: higher. A method beats random when it is better "
                 "on both curves, image by image (paired, 95%), by at least 5%.")
    if report["best"]:
        best = report["methods"][report["best"]]
        lines.append(f"most faithful by deletion: {TITLES[report['best']]}, {best['deletion_ratio']:.2f}x random")
    elif report["methods"]:
        lines.append("no method beats random on deletion here")
    if report["methods"] and random["deletion_auc"] > 0:
        above = [f"{TITLES[name]} {m['deletion_above_floor_ratio']:.2f}x" for name, m in report["methods"].items()
                 if m["deletion_above_floor_ratio"] is not None]
        lines.append(f"every deletion curve ends at the all-black image's probability, {report['floor']:.3f} on "
                     f"average ({report['floor'] / random['deletion_auc']:.2f}x random's AUC, whatever the order); "
                     + (f"the area above it against random's: {', '.join(above)}" if above else
                        "random's curve hardly rises above it, so no ratio above it is given"))
    ig = report["methods"].get("ig")
    if ig and "convergence_delta_median_abs" in ig:
        lines.append(f"Integrated Gradients completeness: median |sum of map - (f(image) - f(black))| "
                     f"{ig['convergence_delta_median_abs']:.4f} (largest {ig['convergence_delta_max_abs']:.4f}) for a "
                     f"mean change of {ig['mean_abs_change_explained']:.3f}")
    lines.extend(report["notes"])
    lines.append("")
    lines.extend(format_baselines(report))
    return "\n".join(lines)


def format_baselines(report: dict) -> list[str]:
    """The table of every map under every fill, the randomisation check and the verdicts."""
    fills = report["fills"]
    names = list(fills)
    lines = ["against maps that ignore the model, under each fill (what a removed pixel becomes: "
             + "; ".join(f"{name}: {fills[name]['text']}" for name in names) + ")",
             f"{'map':<24}" + "".join(f" {name + ' del':>10} {name + ' ins':>10}" for name in names)]
    for base in report["baselines"]:
        cells = "".join(f" {fills[f]['baselines'][base]['deletion_auc']:>10.3f} "
                        f"{fills[f]['baselines'][base]['insertion_auc']:>10.3f}" for f in names)
        lines.append(f"{_NAMES[base]:<24}{cells}")
    for name in report["methods"]:
        cells = ""
        for f in names:
            m = fills[f]["methods"][name]
            marks = ["+" if all(v[curve] == "better" for v in m["versus"].values()) else "-"
                     for curve in ("deletion", "insertion")]
            cells += f" {m['deletion_auc']:>9.3f}{marks[0]} {m['insertion_auc']:>9.3f}{marks[1]}"
        lines.append(f"{_title(name, report):<24}{cells}")
    lines.append("+: better than every baseline on that curve (paired, 95%, by at least 5%); -: not")
    checks = report["randomisation"]
    if "skipped" in checks:
        lines.append(f"randomisation check not run: {checks['skipped']}")
    else:
        first = next(iter(checks.values()))
        lines.append(f"randomisation check (Quantus MPRT, layers randomised top down, cascading, {first['images']} "
                     f"images): rank correlation with the fully randomised network's map, passes below "
                     f"{first['threshold']:.2f}")
        lines.append("  " + "; ".join(f"{_title(name, report)} {c['final_correlation']:.2f} "
                                      f"{'passes' if c['passed'] else 'fails'}" for name, c in checks.items()))
    lines.append("verdicts (faithful: beats every baseline on deletion and insertion under every fill, and passes "
                 "the randomisation check):")
    lines += [f"  {_title(name, report)}: {m['faithfulness']['verdict']}" for name, m in report["methods"].items()]
    return lines
