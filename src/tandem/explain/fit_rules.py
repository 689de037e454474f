"""Extract hierarchical IF-THEN rules from a bundle's network and store them in the bundle (`tandem rules
BUNDLE`). Needs scikit-learn, SciPy and Pillow, not torch.

    report = fit_rules("bundle/", max_leaves=32)   # writes rules.json, concepts/concept_K.png into the bundle
    print(report["fidelity"], report["rules"])

1. The network's logits and the activations of a spatial layer (by default the last block's output) on its own
   training split (the bundle's data).
2. Concepts that are parts: non-negative factorisation (scikit-learn NMF) of those activations at every position
   of every image (ACE and CRAFT factorise image regions the same way), so a concept is what fires at a place,
   shared across the classes that have it. Each is shown by a strip of the image regions where it fires most and
   named after where it fires and on which classes (concepts.py, prototypes: rules_pictures.py).
3. Classes grouped by the concepts they use, and a two-level tree from the region scores to the network's OWN
   predictions: first the group, then the class within it (hierarchy.py). Fidelity is its agreement with the
   network on the test split, accuracy its agreement with the truth; rule_measures.py says whether the rules
   explain or restate (class detectors, circular and contradictory explanations).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from tandem.bundle import read_bundle_file, read_manifest
from tandem.data.stream import split_pixels
from tandem.errors import UserError
from tandem.explain import concepts as concept_math
from tandem.explain import rule_measures as measures
from tandem.explain.hierarchy import class_groups, fit_hierarchy
from tandem.explain.rules import MODEL_FILE, RULES_FILE, SCHEMA, feature_session, run_features
from tandem.explain.rules_pictures import crop_strip
from tandem.explain.rules_store import check_out_folder, check_storable, store_rules, write_report
from tandem.explain.rules_tree import conditions, leaf_classes, path_stats, rules_text, tree_depth, tree_paths

MAX_LEAVES, CONCEPTS = 32, 24  # defaults: at most 32 rules over 24 part concepts (measured on the animals)
MIN_SAMPLES_LEAF = 5      # a rule covers at least this many training images
PROTOTYPES = 8            # regions per prototype strip
FIT_POSITIONS = 60_000    # positions (image x place) the factorisation sees, sampled with a fixed seed
NAME_COVER = 0.8          # a concept is named after the classes covering this share of its top regions


def fit_rules(bundle: str | Path, max_leaves: int = MAX_LEAVES, concepts: int = CONCEPTS, layer: str | None = None,
              groups: int | None = None, store: bool = True, out: str | Path | None = None,
              sign_key: str | Path | None = None, log: Callable = print, force: bool = False) -> dict:
    """Fit concepts, groups and the two-level tree on the bundle's training split, measure them on its test
    split, and store rules.json and the prototype strips in the bundle (store=False: only report)."""
    try:
        from sklearn.decomposition import NMF
    except ImportError:
        raise UserError("fitting rules needs scikit-learn: pip install 'tandem[explain]'") from None
    import onnx

    from tandem.explain.data import bundle_splits

    started = time.perf_counter()
    bundle = Path(bundle)
    if max_leaves < 2 or concepts < 1 or (groups is not None and groups < 1):
        raise UserError("give --max-leaves of at least 2, --concepts and --groups of at least 1")
    if sign_key is not None and not store:
        raise UserError("--sign signs the bundle again after storing the rules; with --no-store nothing is stored: "
                        "drop one of them")
    manifest = read_manifest(bundle)
    if store:
        check_storable(bundle, sign_key)
    if out is not None:
        check_out_folder(Path(out), force)  # before the work, and before the bundle changes
    if MODEL_FILE not in manifest["files"]:
        raise UserError(f"bundle {bundle} has no {MODEL_FILE}; rules are fit on the fp32 model: re-export the bundle")
    model_bytes = read_bundle_file(bundle, manifest, MODEL_FILE)
    tensor, (channels, gh, gw) = concept_math.find_concept_layer(onnx.load_from_string(model_bytes), layer)
    splits = bundle_splits(bundle, manifest)
    if len(splits.test.labels) == 0:
        raise UserError(f"bundle {bundle}: its test split is empty (data.test_fraction=0), so fidelity cannot be "
                        "measured; train with a test split")
    labels = [str(label) for label in manifest["labels"]]
    if groups is not None and groups > len(labels):
        raise UserError(f"--groups {groups} is more than the {len(labels)} classes")
    if concepts > channels:
        raise UserError(f"--concepts {concepts} is more than the {channels} channels of {tensor}; give fewer")

    session = feature_session(model_bytes, tensor)
    log(f"rules: concept layer {tensor} ({channels} x {gh} x {gw}); running the network on "
        f"{len(splits.train.labels):,} training and {len(splits.test.labels):,} test images")
    a_train, l_train, _ = _run(session, tensor, manifest, splits.train)
    a_test, l_test, y_test = _run(session, tensor, manifest, splits.test)
    p_train, p_test = l_train.argmax(axis=1), l_test.argmax(axis=1)

    log(f"rules: {concepts} part concept{'' if concepts == 1 else 's'} by NMF of the activations at every position")
    found = _fit_concepts(a_train, concepts, NMF)
    components = np.asarray(found["components"], np.float32).astype(np.float64)  # what rules.json holds
    c_train, c_test = concept_math.concept_codes(a_train, components), concept_math.concept_codes(a_test, components)
    f_train = concept_math.region_features(c_train)
    scale = np.asarray([_scale(column) for column in f_train.T], np.float32).astype(np.float64)
    stored_fit = {"method": "nmf", "components": _floats(components), "scale": [float(str(v)) for v in
                  np.asarray(scale, np.float32)], "places": list(concept_math.WHERE),
                  "nnls_iterations": concept_math.NNLS_ITERATIONS, "fit_positions": found["positions"]}
    concept_math.load_concepts(stored_fit)  # the checks the runtime makes
    x_train, x_test = f_train / scale, concept_math.region_features(c_test) / scale

    found_groups = class_groups(x_train, p_train, len(labels), groups)
    log(f"rules: {len(found_groups)} group{'' if len(found_groups) == 1 else 's'} of classes by the concepts they "
        f"use, then a two-level tree of at most {max_leaves} leaves on the network's own predictions")

    trees = fit_hierarchy(x_train, p_train, found_groups, max_leaves, MIN_SAMPLES_LEAF, smaller=(8, 16))
    for each in trees.values():
        path_stats(each, x_train, p_train, "train", found_groups)
        path_stats(each, x_test, p_test, "test", found_groups)
    tree = trees[max_leaves]
    leaf_test, leaf_train = leaf_classes(x_test, tree), leaf_classes(x_train, tree)
    by_size = [{"max_leaves": n, "leaves": small["left"].count(-1),  # the price of fewer rules
                "fidelity": float((leaf_classes(x_test, small) == p_test).mean())} for n, small in trees.items()]
    log(f"rules: {tree['left'].count(-1)} leaves, fidelity {(leaf_test == p_test).mean():.1%} on the test split")

    correlations = measures.logit_correlations(x_test[:, ::concept_math.FEATURES_PER_CONCEPT], l_test, labels)
    specific = measures.specificity(c_train, p_train, labels)
    concept_list, strips = _describe_concepts(c_train, p_train, labels, splits.train, specific, correlations)
    group_list = [{"id": g, "classes": members, "name": " / ".join(labels[c] for c in members)}
                  for g, members in enumerate(found_groups)]
    explained = []
    for row, path, answer in zip(x_test, tree_paths(x_test, tree), leaf_test):
        found = conditions(tree, row, path, concept_list)
        explained.append({"circular": measures.circular(found, int(answer), specific),
                          "contradictory": measures.contradictory(found)})
    purpose = measures.summary(explained, correlations, specific, tree, found_groups)
    metrics = {"fidelity": float((leaf_test == p_test).mean()), "accuracy": float((leaf_test == y_test).mean()),
               "network_accuracy": float((p_test == y_test).mean()),
               "fidelity_train": float((leaf_train == p_train).mean()),
               "leaves": tree["left"].count(-1), "depth": tree_depth(tree), **purpose,
               "max_leaves": max_leaves, "fit_split": "train", "fit_images": len(p_train),
               "test_images": len(p_test), "fidelity_by_leaves": by_size,
               "seconds": round(time.perf_counter() - started, 1)}
    rules = {"schema": SCHEMA, "model_file": MODEL_FILE, "model_sha256": manifest["files"][MODEL_FILE]["sha256"],
             "feature_tensor": tensor, "feature_shape": [channels, gh, gw], "concepts_fit": stored_fit,
             "concepts": concept_list, "groups": group_list, "labels": labels, "tree": tree, "metrics": metrics,
             "fit": {"concepts": concepts, "layer": tensor, "max_leaves": max_leaves, "groups": len(found_groups),
                     "min_samples_leaf": MIN_SAMPLES_LEAF, "seed": 0}}
    # Indented for reading, but the components (hundreds of numbers) on one line each.
    text = json.dumps({**rules, "concepts_fit": "@"}, indent=1)
    text = text.replace('"concepts_fit": "@"', '"concepts_fit": ' + json.dumps(stored_fit))
    files = {RULES_FILE: (text + "\n").encode(),
             **{c["prototype"]: png for c, png in zip(concept_list, strips)}}

    report = {"schema": SCHEMA, "bundle": str(bundle), **{k: metrics[k] for k in ("fidelity", "accuracy", "leaves",
              "depth")}, "concepts": concepts, **{k: v for k, v in metrics.items() if k not in
              ("fidelity", "accuracy", "leaves", "depth")}, "feature_tensor": tensor,
              "feature_shape": [channels, gh, gw], "concept_list": concept_list, "groups_list": group_list,
              "rules": rules_text(tree, concept_list, labels, [g["name"] for g in group_list]), "tree": tree,
              "stored": False, "signed_again": False, "out": None}
    if store:
        store_rules(bundle, files)
        report["stored"] = True
        if sign_key is not None:
            from tandem.bundle import sign_bundle

            sign_bundle(bundle, sign_key)
            report["signed_again"] = True
    if out is not None:
        report["out"] = str(out)  # before writing, so that the report written there says where it is
        write_report(Path(out), files, report)
    return report


def _fit_concepts(a_train: np.ndarray, concepts: int, nmf_class) -> dict:
    """NMF components (K, C), unit rows, from a seeded sample of the positions of the training activations."""
    n, c, h, w = a_train.shape
    rows = np.maximum(a_train, 0).transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
    take = np.random.default_rng(0).choice(len(rows), min(len(rows), FIT_POSITIONS), replace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: the components are used as found
        nmf = nmf_class(n_components=concepts, init="nndsvda", max_iter=400, random_state=0).fit(rows[np.sort(take)])
    components = np.maximum(nmf.components_, 0)
    return {"components": components / np.maximum(np.linalg.norm(components, axis=1, keepdims=True), 1e-12),
            "positions": int(len(take))}


def _describe_concepts(codes: np.ndarray, predicted: np.ndarray, labels: list[str], train, specific: list[dict],
                       correlations: list[dict]) -> tuple[list[dict], list[bytes]]:
    """Each concept's name (where it fires, on which of the network's classes), and its strip of regions."""
    grid = codes.shape[2:]
    rows, cols = concept_math.region_edges(grid[0]), concept_math.region_edges(grid[1])
    concept_list, strips = [], []
    for k in range(codes.shape[1]):
        top = measures.top_regions(codes, k)
        share = np.bincount(predicted[[i for i, _, _ in top]], minlength=len(labels)) / max(1, len(top))
        places = [concept_math.REGIONS[3 * int(np.searchsorted(rows, r, "right") - 1) +
                                       int(np.searchsorted(cols, c, "right") - 1)] for _, r, c in top]
        place = max(set(places), key=places.count)
        name = f"{place} of {_classes(share, labels)}"
        shown = top[:PROTOTYPES]  # strongest first
        images = np.array([i for i, _, _ in shown])
        ascending = np.sort(images)  # the order a streamed folder's files are best read in
        pixels = split_pixels(train, ascending)[0][np.searchsorted(ascending, images)]
        strips.append(crop_strip(pixels, [(r, c) for _, r, c in shown], grid, f"concept {k}: {name}"))
        concept_list.append({"id": k, "name": name, "place": place, "prototype": f"concepts/concept_{k}.png",
                             "top_labels": {labels[i]: round(float(share[i]), 3) for i in np.argsort(-share)[:3]
                                            if share[i] > 0},
                             "specific": specific[k], "logit_correlation": correlations[k],
                             "prototype_regions": [list(t) for t in shown]})
    return concept_list, strips


def _classes(share: np.ndarray, labels: list[str]) -> str:
    """'zebra', 'horse, zebra', or 'cat, dog, bird, ...': the classes covering NAME_COVER of the top regions."""
    order, names, covered = np.argsort(-share, kind="stable"), [], 0.0
    for i in order[:3]:
        if share[i] <= 0:
            break
        names.append(labels[i])
        covered += share[i]
        if covered >= NAME_COVER:
            break
    return ", ".join(names) + ("" if covered >= NAME_COVER else ", ...")


# --- the network on a split ------------------------------------------------------------------------------


def _run(session, tensor: str, manifest: dict, split, chunk: int = 1024):
    """The layer's activations (float32 (N, C, H, W)), the logits and true labels of a whole split, in chunks."""
    from tandem.runtime.preprocess import preprocess

    name, pre = manifest["inputs"][0]["name"], manifest["preprocessing"]
    features, logits, truth = [], [], []
    n = len(split.labels)
    for start in range(0, n, chunk):
        pixels, labels = split_pixels(split, np.arange(start, min(start + chunk, n)))
        out, feats = run_features(session, {name: preprocess(pixels, pre["mean"], pre["std"])}, tensor)
        features.append(feats)
        logits.append(out)
        truth.append(labels)
    return np.concatenate(features), np.concatenate(logits), np.concatenate(truth)


def _scale(column: np.ndarray) -> float:
    for value in (np.percentile(column, 99), column.max()):
        if value > 0:
            return float(value)
    return 1.0


def _floats(matrix: np.ndarray) -> list[list[float]]:
    """float32 values as the shortest decimals that give them back (rules.json stays small and exact)."""
    return [[float(str(v)) for v in row] for row in np.asarray(matrix, np.float32)]
