"""Extract IF-THEN rules from a bundle's network and store them in the bundle (`tandem rules BUNDLE`).
Needs scikit-learn and Pillow, not torch.

    report = fit_rules("bundle/", max_leaves=32)   # writes rules.json, concepts/concept_K.png into the bundle
    print(report["fidelity"], report["rules"])

1. The network's penultimate activations and predictions on its own training split (the bundle's data).
2. Concepts: non-negative factorisation (scikit-learn NMF) of the part of those activations the last layer
   reads (their projection onto the span of its weights, negatives set to 0): the rest of the activation
   cannot change the answer, and concepts found there cost the rules their fidelity (see the README).
   Each concept is shown by its most activating training images (a prototype strip PNG).
3. A shallow decision tree (max_leaf_nodes) from concept scores to the network's OWN predictions; fidelity
   is its agreement with the network on the test split, accuracy its agreement with the truth.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from tandem.bundle import read_bundle_file, read_manifest
from tandem.data.stream import split_pixels
from tandem.errors import UserError
from tandem.explain.rules import (MODEL_FILE, RULES_FILE, SCHEMA, concept_scores, feature_session, find_readout,
                                  load_scores, rules_text, run_features, tree_depth, tree_paths)
from tandem.explain.rules_store import check_out_folder, check_storable, store_rules, write_report

MAX_LEAVES, CONCEPTS = 32, 16  # defaults: at most 32 rules; 16 concepts (more for more than 10 classes)
SPACES = ("used", "all")  # concepts from the part of the activation the last layer reads, or from all of it
MIN_SAMPLES_LEAF = 5      # a rule covers at least this many training images
PROTOTYPES = 8            # images per prototype strip
NAMED_BY = 50             # a concept is named after the network's labels of its top images


def default_concepts(classes: int) -> int:
    """16, or 1.5 per class past 10 classes: fewer concepts than classes leave a class without one of its own,
    and the rules lose fidelity (measured: 8 concepts for 10 animals, 93.0%; 10 to 24 concepts, 97.5-99.1%)."""
    return max(CONCEPTS, classes + classes // 2)


def fit_rules(bundle: str | Path, max_leaves: int = MAX_LEAVES, concepts: int | None = None, space: str = "used",
              store: bool = True, out: str | Path | None = None, sign_key: str | Path | None = None,
              log: Callable = print, force: bool = False) -> dict:
    """Fit concepts and a tree on the bundle's training split, measure them on its test split, and store
    rules.json and the prototype strips in the bundle (store=False: only report). Returns the report."""
    try:
        from sklearn.decomposition import NMF
        from sklearn.tree import DecisionTreeClassifier
    except ImportError:
        raise UserError("fitting rules needs scikit-learn: pip install 'tandem[explain]'") from None
    from tandem.explain.data import bundle_splits

    bundle = Path(bundle)
    if space not in SPACES:
        raise UserError(f"concept space {space!r} is not one of {', '.join(SPACES)}")
    if max_leaves < 2 or (concepts is not None and concepts < 1):
        raise UserError("give --max-leaves of at least 2 and --concepts of at least 1")
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
    import onnx

    readout = find_readout(onnx.load_from_string(model_bytes))
    splits = bundle_splits(bundle, manifest)
    if len(splits.test.labels) == 0:
        raise UserError(f"bundle {bundle}: its test split is empty (data.test_fraction=0), so fidelity cannot be "
                        "measured; train with a test split")
    dims = readout.weight.shape[0]
    if concepts is None:
        concepts = min(default_concepts(readout.weight.shape[1]), dims, len(splits.train.labels))
    elif concepts > min(dims, len(splits.train.labels)):
        raise UserError(f"--concepts {concepts} is more than this network's penultimate layer ({dims} values) or its "
                        f"training split ({len(splits.train.labels)} images) allows; give fewer")

    session = feature_session(model_bytes, readout.tensor)
    labels = [str(label) for label in manifest["labels"]]
    log(f"rules: penultimate layer {readout.tensor} ({dims} values); running the network on "
        f"{len(splits.train.labels):,} training and {len(splits.test.labels):,} test images")
    f_train, p_train, _ = _run(session, readout.tensor, manifest, splits.train)
    f_test, p_test, y_test = _run(session, readout.tensor, manifest, splits.test)
    if f_train.shape[1] != dims:
        raise UserError(f"bundle {bundle}: {readout.tensor} has {f_train.shape[1]} values, the last layer reads {dims}")

    log(f"rules: {concepts} concept{'' if concepts == 1 else 's'} by NMF of "
        f"{'the part of the activation the last layer reads' if space == 'used' else 'the whole activation'}")
    scores_json = _fit_concepts(f_train, readout.weight, space, concepts, NMF)
    spec = load_scores(json.loads(json.dumps(scores_json)))  # exactly what the runtime will compute with
    s_train, s_test = concept_scores(f_train, spec), concept_scores(f_test, spec)

    log(f"rules: a decision tree of at most {max_leaves} leaves on the network's own predictions")

    def fit(leaves: int):
        return DecisionTreeClassifier(max_leaf_nodes=leaves, min_samples_leaf=MIN_SAMPLES_LEAF,
                                      random_state=0).fit(s_train, p_train)

    def leaves_of(tree: dict, scores: np.ndarray) -> np.ndarray:
        return np.array([tree["class"][path[-1]] for path in tree_paths(scores, tree)])

    tree = _tree_json(fit(max_leaves), s_test, p_test)
    leaf_test, leaf_train = leaves_of(tree, s_test), leaves_of(tree, s_train)
    by_size = []  # the price of fewer rules
    for n in sorted({n for n in (2, 4, 8, 12, 16, 24, 32, 48, 64) if n < max_leaves} | {max_leaves}):
        small = tree if n == max_leaves else _tree_json(fit(n), s_test, p_test)
        by_size.append({"max_leaves": n, "leaves": small["left"].count(-1),
                        "fidelity": float((leaves_of(small, s_test) == p_test).mean())})

    concept_list, strips = _describe_concepts(s_train, p_train, labels, splits.train)
    metrics = {"fidelity": float((leaf_test == p_test).mean()), "accuracy": float((leaf_test == y_test).mean()),
               "network_accuracy": float((p_test == y_test).mean()),
               "fidelity_train": float((leaf_train == p_train).mean()),
               "leaves": tree["left"].count(-1), "depth": tree_depth(tree),
               "max_leaves": max_leaves, "fit_split": "train", "fit_images": len(p_train),
               "test_images": len(p_test), "fidelity_by_leaves": by_size}
    rules = {"schema": SCHEMA, "model_file": MODEL_FILE, "model_sha256": manifest["files"][MODEL_FILE]["sha256"],
             "feature_tensor": readout.tensor, "feature_size": int(dims), "scores": scores_json,
             "concepts": concept_list, "labels": labels, "tree": tree, "metrics": metrics,
             "fit": {"concepts": concepts, "space": space, "max_leaves": max_leaves,
                     "min_samples_leaf": MIN_SAMPLES_LEAF, "seed": 0}}
    # Indented for reading, but the score matrices (thousands of numbers) on one line.
    text = json.dumps({**rules, "scores": "@"}, indent=1)
    text = text.replace('"scores": "@"', '"scores": ' + json.dumps(scores_json))
    files = {RULES_FILE: (text + "\n").encode(),
             **{c["prototype"]: png for c, png in zip(concept_list, strips)}}

    report = {"schema": SCHEMA, "bundle": str(bundle), **{k: metrics[k] for k in ("fidelity", "accuracy", "leaves",
              "depth")}, "concepts": concepts, "space": space, **{k: v for k, v in metrics.items() if k not in
              ("fidelity", "accuracy", "leaves", "depth")}, "feature_tensor": readout.tensor, "feature_size": int(dims),
              "concept_list": concept_list, "rules": rules_text(tree, concept_list, labels), "tree": tree,
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


def _fit_concepts(f_train: np.ndarray, weight: np.ndarray, space: str, concepts: int, nmf_class) -> dict:
    """rules.json's "scores": NMF directions in what the last layer reads (space "used": the activation projected
    onto the span of its weights; "all": the whole activation), negatives set to 0. A score is the projection on
    a concept's unit direction, scaled so that 1 is the 99th percentile of the training split."""
    basis = _span(weight) if space == "used" else None
    read = np.maximum(f_train.astype(np.float64) if basis is None else f_train @ basis.T @ basis, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: the directions are used as found
        nmf = nmf_class(n_components=concepts, init="nndsvda", max_iter=500, random_state=0).fit(read)
    unit = nmf.components_ / np.maximum(np.linalg.norm(nmf.components_, axis=1, keepdims=True), 1e-12)
    scale = np.array([_scale(column) for column in (read @ unit.T).T])
    return {"space": space, "method": "nmf", "basis": None if basis is None else _floats(basis),
            "directions": _floats(unit / scale[:, None]),
            "formula": "max(f @ basis.T @ basis, 0) @ directions.T (basis null: max(f, 0) @ directions.T)"}


def _describe_concepts(s_train: np.ndarray, p_train: np.ndarray, labels: list[str], train) -> tuple[list[dict], list[bytes]]:
    """Each concept's name (the network's labels of its top training images), and its prototype strip."""
    concept_list, strips = [], []
    for k in range(s_train.shape[1]):
        top = np.argsort(-s_train[:, k], kind="stable")
        named = np.bincount(p_train[top[:NAMED_BY]], minlength=len(labels)) / min(NAMED_BY, len(top))
        name = _name(named, labels)
        shown = top[:PROTOTYPES]  # strongest first
        ascending = np.sort(shown)  # the order a streamed folder's files are best read in
        pixels = split_pixels(train, ascending)[0][np.searchsorted(ascending, shown)]
        strips.append(_strip_png(pixels, f"concept {k}: {name}"))
        concept_list.append({"id": k, "name": name, "prototype": f"concepts/concept_{k}.png",
                             "top_labels": {labels[i]: round(float(named[i]), 3) for i in np.argsort(-named)[:3]
                                            if named[i] > 0},
                             "prototype_images": [int(i) for i in shown]})
    return concept_list, strips


# --- the network on a split ------------------------------------------------------------------------------


def _run(session, tensor: str, manifest: dict, split, chunk: int = 1024):
    """Penultimate activations (float32 (N, D)), predicted classes and true labels of a whole split, in chunks."""
    from tandem.runtime.preprocess import preprocess

    name, pre = manifest["inputs"][0]["name"], manifest["preprocessing"]
    features, predicted, truth = [], [], []
    n = len(split.labels)
    for start in range(0, n, chunk):
        pixels, labels = split_pixels(split, np.arange(start, min(start + chunk, n)))
        logits, feats = run_features(session, {name: preprocess(pixels, pre["mean"], pre["std"])}, tensor)
        features.append(feats)
        predicted.append(logits.argmax(axis=1))
        truth.append(labels)
    return np.concatenate(features), np.concatenate(predicted), np.concatenate(truth)


def _span(weight: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the last layer's weight vectors (features, classes) -> (rank, features)."""
    u, s, _ = np.linalg.svd(weight, full_matrices=False)
    rank = int((s > s.max() * 1e-6).sum()) if s.size and s.max() > 0 else 0
    if rank == 0:
        raise UserError("the network's last layer has all-zero weights; there is nothing to explain")
    return u[:, :rank].T


def _scale(column: np.ndarray) -> float:
    for value in (np.percentile(column, 99), column.max()):
        if value > 0:
            return float(value)
    return 1.0


def _floats(matrix: np.ndarray) -> list[list[float]]:
    """float32 values as the shortest decimals that give them back (rules.json stays small and exact)."""
    return [[float(str(v)) for v in row] for row in np.asarray(matrix, np.float32)]


def _name(fractions: np.ndarray, labels: list[str]) -> str:
    """'like giraffe', or 'like horse, zebra': the labels covering 80% of the concept's top images (at most 3)."""
    order, names, covered = np.argsort(-fractions, kind="stable"), [], 0.0
    for i in order[:3]:
        if fractions[i] <= 0:
            break
        names.append(labels[i])
        covered += fractions[i]
        if covered >= 0.8:
            break
    return "like " + ", ".join(names) + ("" if covered >= 0.8 else ", ...")


def _tree_json(clf, s_test: np.ndarray, p_test: np.ndarray) -> dict:
    """scikit-learn's tree as plain JSON, children after parents, with each node's class and agreement on the
    training and test splits. A test whose both sides end in the same class is dropped: it changes no answer."""
    t = clf.tree_
    value = t.value[:, 0, :]
    same = [None] * t.node_count  # the one class every leaf below predicts, or None
    for node in reversed(range(t.node_count)):
        lo, hi = t.children_left[node], t.children_right[node]
        if lo == -1:
            same[node] = int(value[node].argmax())
        elif same[lo] is not None and same[lo] == same[hi]:
            same[node] = same[lo]
    tree: dict[str, list] = {k: [] for k in ("left", "right", "feature", "threshold", "class", "train_images",
                                             "train_agree")}

    def emit(node: int) -> int:
        new = len(tree["left"])
        for k in tree:
            tree[k].append(None)
        cls = same[node] if same[node] is not None else int(value[node].argmax())
        tree["class"][new] = int(clf.classes_[cls])
        tree["train_images"][new] = int(t.n_node_samples[node])
        tree["train_agree"][new] = round(float(value[node][cls] / value[node].sum()), 4)
        if same[node] is not None:
            tree["left"][new] = tree["right"][new] = tree["feature"][new] = -1
            tree["threshold"][new] = 0.0
        else:
            tree["feature"][new], tree["threshold"][new] = int(t.feature[node]), float(t.threshold[node])
            tree["left"][new] = emit(int(t.children_left[node]))
            tree["right"][new] = emit(int(t.children_right[node]))
        return new

    emit(0)
    seen = np.zeros(len(tree["left"]), int)
    agree = np.zeros(len(tree["left"]), int)
    for path, predicted in zip(tree_paths(s_test, tree), p_test):
        for node in path:
            seen[node] += 1
            agree[node] += int(tree["class"][node] == predicted)
    tree["test_images"] = seen.tolist()
    tree["test_agree"] = [round(int(a) / int(n), 4) if n else 0.0 for a, n in zip(agree, seen)]
    return tree


def _strip_png(pixels: np.ndarray, caption: str) -> bytes:
    """The images side by side, enlarged, under a caption."""
    from PIL import Image, ImageDraw

    n, h, w, c = pixels.shape
    zoom = max(1, 96 // max(h, w))
    gap, top = 4, 18
    strip = Image.new("RGB", (n * (w * zoom + gap) + gap, h * zoom + top + gap), "white")
    for i, image in enumerate(pixels):
        tile = Image.fromarray(image[..., 0] if c == 1 else image[..., :3]).convert("RGB")
        strip.paste(tile.resize((w * zoom, h * zoom), Image.NEAREST), (gap + i * (w * zoom + gap), top))
    ImageDraw.Draw(strip).text((gap, 3), caption, fill="black")
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    return buffer.getvalue()
