"""Apply the rules stored in a bundle (rules.json, written by `tandem rules`): which rule of the tree each
prediction follows, in words. Torch-free and scikit-learn-free: numpy, onnx, onnxruntime.

    rules = RuleSet.load("bundle/")                  # None when the bundle has no rules.json; files read are verified
    for why in rules.explain(rules.predictor.pixels(["cat.png"])):
        print(why["text"])                           # "cat, because concept 4 (like cat) is high (0.81 > 0.40) ..."
    print(rules.text())                              # the whole tree as indented IF-THEN rules
    png = rules.prototype_png(4)                     # concept 4 shown by its most activating training images

How a score is computed (the very function fit_rules fit the tree on, so both sides compute the same scores):
the penultimate activation f (the input of the last Gemm/MatMul, `feature_tensor`), projected onto the
part the last layer reads (`basis`: orthonormal rows spanning its weights; the rest of f cannot change the
answer), negatives set to 0, then one non-negative direction per concept: scores = max(f B^T B, 0) D^T
(with `basis` null, for concepts of the whole activation: max(f, 0) D^T).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tandem.bundle import REEXPORT, read_bundle_file, read_manifest
from tandem.errors import UserError

RULES_FILE = "rules.json"
SCHEMA = "tandem.rules/1"
MODEL_FILE = "model.onnx"  # rules are fit on the fp32 graph, whatever precision the runtime serves
RERUN = "run `tandem rules BUNDLE` again"
# Between the last layer and the logits only these may stand (the logits stay a function of W f).
_PASS_THROUGH = ("Identity", "Add", "Sub", "Softmax", "LogSoftmax", "Cast")


# --- the penultimate layer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Readout:
    """The last layer: logits = features @ weight (+ bias); features is the tensor named `tensor`."""
    tensor: str
    weight: np.ndarray  # (features, classes)


def find_readout(model: Any) -> Readout:
    """The last Gemm/MatMul that produces the graph's first output, walking back over bias adds, softmax,
    identities; its data input is the penultimate layer. Works for any exported model (cnn, mlp, resnet)."""
    from onnx import numpy_helper

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(graph.output[0].name)
    while node is not None and node.op_type in _PASS_THROUGH:
        variable = [name for name in node.input if name and name not in constants]
        node = producer.get(variable[0]) if len(variable) == 1 else None
    attrs = {a.name: a for a in node.attribute} if node is not None else {}
    if node is not None and node.op_type in ("Gemm", "MatMul") and node.input[1] in constants \
            and node.input[0] not in constants and not (attrs.get("transA") and attrs["transA"].i):
        weight = constants[node.input[1]].astype(np.float64)
        if node.op_type == "Gemm":
            weight = weight.T if attrs.get("transB") and attrs["transB"].i else weight
            weight = weight * (attrs["alpha"].f if "alpha" in attrs else 1.0)
        if weight.ndim == 2:
            return Readout(node.input[0], weight)
    raise UserError("cannot find the network's last layer (a Gemm or MatMul with constant weights producing the "
                    "logits) in model.onnx; rules need it to read the penultimate layer")


def feature_session(model_bytes: bytes, tensor: str, options: Any = None) -> Any:
    """An ONNX Runtime session that can also output the penultimate tensor (see run_features)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(model_bytes)
    if tensor not in [o.name for o in model.graph.output]:
        model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_features(session: Any, feeds: dict, tensor: str) -> tuple[np.ndarray, np.ndarray]:
    """One run of a feature_session: the logits (the graph's first output) and the penultimate tensor (N, D)."""
    logits, features = session.run([session.get_outputs()[0].name, tensor], feeds)
    return logits, features.reshape(len(features), -1)


def load_scores(stored: dict) -> dict:
    """rules.json's "scores" as the arrays concept_scores takes: float32 values, computed in float64."""
    basis = stored["basis"]
    directions = np.asarray(stored["directions"], np.float32).astype(np.float64)
    basis = None if basis is None else np.asarray(basis, np.float32).astype(np.float64)
    if directions.ndim != 2 or (basis is not None and (basis.ndim != 2 or basis.shape[1] != directions.shape[1])):
        raise ValueError("scores.directions must be (concepts, features) and scores.basis (rank, features) or null")
    return {"basis": basis, "directions": directions}


def concept_scores(features: np.ndarray, scores: dict) -> np.ndarray:
    """(N, D) penultimate activations -> (N, K) concept scores; `scores` comes from load_scores."""
    f = np.asarray(features, np.float64).reshape(len(features), -1)
    if f.shape[1] != scores["directions"].shape[1]:
        raise UserError(f"the penultimate layer has {f.shape[1]} values, the rules expect "
                        f"{scores['directions'].shape[1]}; {RERUN}")
    basis = scores["basis"]
    return np.maximum(f if basis is None else (f @ basis.T) @ basis, 0.0) @ scores["directions"].T


# --- the tree --------------------------------------------------------------------------------------------


def tree_paths(scores: np.ndarray, tree: dict) -> list[list[int]]:
    """Node ids from the root to a leaf, per row: left when score <= threshold, as scikit-learn does
    (it compares float32 scores with float64 thresholds)."""
    x = np.asarray(scores, np.float64).astype(np.float32).astype(np.float64)  # float32 values, float64 compares
    left, right, feature, threshold = tree["left"], tree["right"], tree["feature"], tree["threshold"]
    paths = []
    for row in x:
        node, path = 0, [0]
        while left[node] != -1:
            node = left[node] if row[feature[node]] <= threshold[node] else right[node]
            path.append(node)
        paths.append(path)
    return paths


def tree_depth(tree: dict) -> int:
    depth = [0] * len(tree["left"])
    for node, (lo, hi) in enumerate(zip(tree["left"], tree["right"])):  # children come after their parent
        if lo != -1:
            depth[lo] = depth[hi] = depth[node] + 1
    return max(depth)


def _check_tree(tree: Any, concepts: int, classes: int) -> dict:
    keys = ("left", "right", "feature", "threshold", "class", "test_images", "test_agree")
    if not isinstance(tree, dict) or any(not isinstance(tree.get(k), list) for k in keys):
        raise ValueError(f"tree needs the lists {', '.join(keys)}")
    n = len(tree["left"])
    if n == 0 or any(len(tree[k]) != n for k in keys):
        raise ValueError("the tree's lists differ in length")
    out = {k: list(tree[k]) for k in keys}
    for node in range(n):
        lo, hi = out["left"][node], out["right"][node]
        if type(lo) is not int or type(hi) is not int:
            raise ValueError(f"node {node}'s children are not node numbers")
        if any(not _is_number(out[k][node]) for k in ("threshold", "test_images", "test_agree")):
            raise ValueError(f"node {node}'s threshold or test counts are not numbers")
        if (lo == -1) != (hi == -1) or (lo != -1 and not (node < lo < n and node < hi < n)):
            raise ValueError(f"node {node} has bad children")  # children after parents: no loops
        if lo != -1 and not (type(out["feature"][node]) is int and 0 <= out["feature"][node] < concepts):
            raise ValueError(f"node {node} tests no concept")
        if type(out["class"][node]) is not int or not 0 <= out["class"][node] < classes:
            raise ValueError(f"node {node} has no class")
    out["threshold"] = [float(t) for t in out["threshold"]]
    return out


# --- the rule set ----------------------------------------------------------------------------------------


def _num(x: float) -> str:
    """Two decimals, or two significant digits where two decimals would print a small threshold as 0.00."""
    return f"{x:.2f}" if x == 0 or abs(x) >= 0.005 else f"{x:.2g}"


def _because(conditions: list[dict]) -> str:
    """'concept 3 (like giraffe) is high (0.97 > 0.53) and concept 7 (like horse) is low (0.20 <= 0.61)';
    past two "low" conditions (a chain of "not this, not that"), those are listed without their values."""
    def full(c: dict) -> str:
        return (f"concept {c['concept']} ({c['name']}) is {'high' if c['op'] == '>' else 'low'} "
                f"({_num(c['value'])} {c['op']} {_num(c['threshold'])})")

    high = [full(c) for c in conditions if c["op"] == ">"]
    low = [c for c in conditions if c["op"] == "<="]
    if len(low) <= 2:
        return " and ".join(high + [full(c) for c in low])
    names = [f"{c['concept']} ({c['name']})" for c in low]
    return " and ".join(high + [f"concepts {', '.join(names[:-1])} and {names[-1]} are low"])


class RuleSet:
    """Stored rules of one bundle, ready to explain predictions: `explain`, `text`, `prototype_png`."""

    def __init__(self, bundle: Path, manifest: dict, data: dict, session: Any) -> None:
        from tandem.runtime.predictor import Predictor

        self.bundle, self.manifest, self.data = bundle, manifest, data
        self.labels: list[str] = data["labels"]
        self.concepts: list[dict] = data["concepts"]
        self.metrics: dict = data["metrics"]
        self.fidelity = float(self.metrics["fidelity"])
        self.tree = _check_tree(data["tree"], len(self.concepts), len(self.labels))
        self.predictor = Predictor(session, manifest, precision="fp32")  # preprocessing, labels, image forms
        self.predictor._check_against_the_graph()
        if self.predictor.labels != self.labels:
            raise UserError(f"bundle {bundle}: {RULES_FILE} was fit for other labels than the manifest's; {RERUN}")
        self.scores = load_scores(data["scores"])

    @classmethod
    def load(cls, bundle: str | Path, manifest: dict | None = None) -> RuleSet | None:
        """The bundle's rules, or None when its manifest lists no rules.json. Every file read is hash-verified."""
        from tandem.runtime.predictor import runtime_session_options

        bundle = Path(bundle)
        manifest = manifest if manifest is not None else read_manifest(bundle, verify=False)
        if RULES_FILE not in (manifest.get("files") or {}):
            return None
        raw = _read_rules_file(bundle, manifest, RULES_FILE)
        try:
            data = json.loads(raw, parse_constant=_no_constant)  # NaN, Infinity: not numbers a rule can use
            if not isinstance(data, dict) or data.get("schema") != SCHEMA:
                raise ValueError(f"its schema is {data.get('schema') if isinstance(data, dict) else None!r}, "
                                 f"not {SCHEMA}")
            _check_data(data)
        except (ValueError, KeyError, TypeError, ArithmeticError) as err:
            raise UserError(f"bundle {bundle}: {RULES_FILE} is malformed ({err}); {RERUN}") from None
        listed = manifest["files"].get(MODEL_FILE, {}).get("sha256")
        if data["model_sha256"] != listed:
            raise UserError(f"bundle {bundle}: {RULES_FILE} was fit on another {MODEL_FILE} than the bundle holds; "
                            f"{RERUN}")
        model = read_bundle_file(bundle, manifest, MODEL_FILE)
        try:
            session = feature_session(model, data["feature_tensor"], runtime_session_options())
        except Exception as err:  # onnxruntime raises its own types
            raise UserError(f"bundle {bundle}: ONNX Runtime cannot run {MODEL_FILE} with its penultimate layer "
                            f"exposed ({str(err).splitlines()[0]}); {RERUN}") from None
        return cls(bundle, manifest, data, session)

    def scores_and_predictions(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, C) -> concept scores (N, K) and the network's predicted class indices (N,)."""
        from tandem.runtime.preprocess import preprocess

        p = self.predictor
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (p.image_size, p.image_size, p.channels):
            raise UserError(f"rules explain uint8 images of shape (N, {p.image_size}, {p.image_size}, {p.channels}), "
                            f"got {pixels.dtype} {pixels.shape}; convert them with predictor.pixels(...)")
        logits, features = [], []
        for i in range(0, len(pixels), p.batch_size):
            out = run_features(p.session, {p.input_name: preprocess(pixels[i:i + p.batch_size], p.mean, p.std)},
                               self.data["feature_tensor"])
            logits.append(out[0])
            features.append(out[1])
        return concept_scores(np.concatenate(features), self.scores), np.concatenate(logits).argmax(axis=1)

    def explain(self, pixels: np.ndarray) -> list[dict]:
        """One dict per image: the tree's label, the network's, whether they agree, the conditions on its path
        (the tightest bound per concept and direction, "high" ones first; `nodes` lists the tree's nodes walked),
        a sentence, and the rule set's test-split fidelity."""
        scores, predicted = self.scores_and_predictions(pixels)
        out = []
        for row, network, path in zip(scores, predicted, tree_paths(scores, self.tree)):
            leaf = path[-1]
            label = self.tree["class"][leaf]
            conditions = self._conditions(row, path)
            because = _because(conditions)
            out.append({
                "label": self.labels[label], "index": int(label),
                "network_label": self.labels[int(network)], "network_index": int(network),
                "agrees": bool(label == network), "conditions": conditions,
                "text": f"{self.labels[label]}, because {because}" if because else self.labels[label],
                "fidelity": self.fidelity, "nodes": path,
                "leaf": {"node": leaf, "test_images": self.tree["test_images"][leaf],
                         "test_agree": self.tree["test_agree"][leaf]},
            })
        return out

    def explain_files(self, paths: list[str]) -> Iterator[tuple[Path, dict | None, str | None]]:
        """(path, the rule path of explain(), None) per image file (folders searched), (path, None, error) per
        unreadable one. The paths are expanded now (a UserError before any output); the images as they are
        decoded, so a folder of any size, and an unreadable file does not stop the rest."""
        from tandem.images import expand_paths

        return self._explain_decoded(expand_paths(paths))

    def _explain_decoded(self, files: list[Path]) -> Iterator[tuple[Path, dict | None, str | None]]:
        from tandem.images import decode_file_batches

        p = self.predictor
        chunks = decode_file_batches(files, p.image_size, p.channels, p.resize)
        try:
            for chunk in chunks:
                good = [pixels for _, pixels, _ in chunk if pixels is not None]
                why = iter(self.explain(np.stack(good))) if good else iter(())
                for path, pixels, error in chunk:
                    yield (path, None, error) if pixels is None else (path, next(why), None)
        finally:
            chunks.close()

    def _conditions(self, row: np.ndarray, path: list[int]) -> list[dict]:
        tight: dict[tuple[int, str], float] = {}  # (concept, op) -> the tightest threshold, in path order
        for node, child in zip(path, path[1:]):
            concept, threshold = self.tree["feature"][node], self.tree["threshold"][node]
            op = "<=" if child == self.tree["left"][node] else ">"
            old = tight.get((concept, op))
            tight[(concept, op)] = threshold if old is None else (max if op == ">" else min)(old, threshold)
        ordered = sorted(tight.items(), key=lambda item: item[0][1] != ">")  # what is there, then what is not
        return [{"concept": c, "name": self.concepts[c]["name"], "op": op, "threshold": t,
                 "value": float(row[c]), "prototype": self.concepts[c]["prototype"]}
                for (c, op), t in ordered]

    def prototype_png(self, concept: int) -> bytes:
        """The concept's prototype strip (its most activating training images), hash-verified."""
        if not isinstance(concept, int) or not 0 <= concept < len(self.concepts):
            raise UserError(f"concept {concept} does not exist; these rules have concepts 0 to "
                            f"{len(self.concepts) - 1}")
        return _read_rules_file(self.bundle, self.manifest, self.concepts[concept]["prototype"])

    def text(self) -> str:
        return rules_text(self.tree, self.concepts, self.labels)


def rules_text(tree: dict, concepts: list[dict], labels: list[str], indent: str = "    ") -> str:
    """The tree as indented IF-THEN rules, the "high" branch first; each leaf with its test-split agreement."""
    lines: list[str] = []

    def leaf(node: int) -> str:
        n, agree = tree["test_images"][node], tree["test_agree"][node]
        seen = f"{n} test image{'s' if n != 1 else ''}, {agree:.0%} agree" if n else "no test images"
        return f"{labels[tree['class'][node]]}  ({seen})"

    def walk(node: int, depth: int, keyword: str = "if") -> None:
        pad = indent * depth
        if tree["left"][node] == -1:
            lines.append(pad + leaf(node))
            return
        c, low = tree["feature"][node], tree["left"][node]
        lines.append(f"{pad}{keyword} concept {c} ({concepts[c]['name']}) > {_num(tree['threshold'][node])}:")
        walk(tree["right"][node], depth + 1)
        if tree["left"][low] != -1:  # a chain of tests reads as if / elif / elif, not ever deeper
            walk(low, depth, "elif")
        else:
            lines.append(f"{pad}else:")
            walk(low, depth + 1)

    walk(0, 0)
    return "\n".join(lines)


def _read_rules_file(bundle: Path, manifest: dict, name: str) -> bytes:
    """A file `tandem rules` wrote, hash-verified; when it is missing or changed, the fix is to fit the rules again
    (they are not part of what export writes)."""
    try:
        return read_bundle_file(bundle, manifest, name)
    except UserError as err:
        text = str(err).replace(f"; {REEXPORT}", "").replace(f" — {REEXPORT}", "")
        raise UserError(f"{text}; {RERUN.replace('BUNDLE', str(bundle))}, or copy the bundle again") from None


def _no_constant(name: str):
    raise ValueError(f"it holds {name}, which is not a number")


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and abs(value) < 1e300  # finite, and float() of it cannot overflow


def _check_data(data: dict) -> None:
    """The shape of rules.json (ValueError/KeyError/TypeError with what is wrong)."""
    for key, kind in (("model_sha256", str), ("feature_tensor", str), ("labels", list), ("concepts", list),
                      ("scores", dict), ("tree", dict), ("metrics", dict)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{key} is missing or not a {kind.__name__}")
    if not data["concepts"] or any(not isinstance(c, dict) or type(c.get("id")) is not int
                                   or not isinstance(c.get("name"), str) or not isinstance(c.get("prototype"), str)
                                   for c in data["concepts"]):
        raise ValueError("concepts need an id, a name and a prototype each")
    scores = load_scores(data["scores"])
    if not all(np.isfinite(a).all() for a in scores.values() if a is not None):
        raise ValueError("scores hold values that are not finite")
    if scores["directions"].shape[0] != len(data["concepts"]):
        raise ValueError("scores.directions has not one row per concept")
    metrics = data["metrics"]
    if any(not _is_number(metrics.get(key)) for key in ("fidelity", "accuracy", "leaves", "depth", "test_images")):
        raise ValueError("metrics need fidelity, accuracy, leaves, depth and test_images as numbers")
    if not 0.0 <= metrics["fidelity"] <= 1.0:
        raise ValueError("metrics.fidelity is not between 0 and 1")
    _check_tree(data["tree"], len(data["concepts"]), len(data["labels"]))
