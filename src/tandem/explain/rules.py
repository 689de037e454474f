"""Apply the rules stored in a bundle (rules.json, written by `tandem rules`): the path each prediction takes
through the hierarchy (which group of classes, then which class in it), in words and with where each concept
fired. Torch-free and scikit-learn-free: numpy, onnx, onnxruntime, Pillow.

    rules = RuleSet.load("bundle/")                  # None when the bundle has no rules.json; files read are verified
    for why in rules.explain(rules.predictor.pixels(["cat.png"])):
        print(why["text"])     # "the cat / dog group, because concept 4 (...) at the top is strong ...; within it, cat, ..."
    print(rules.text())                              # the whole tree as indented IF-THEN rules
    png = rules.prototype_png(4)                     # concept 4 shown by the image regions where it fires most

How a score is computed (concepts.py, the very functions fit_rules fit the tree with): the activation of a spatial
layer (`feature_tensor`, (N, C, H, W)), at each position written as a non-negative mix of the concepts'
components; per concept its strongest response anywhere, its mean, and its strongest in each of nine regions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tandem.bundle import REEXPORT, read_bundle_file, read_manifest
from tandem.errors import UserError
from tandem.explain import concepts as concept_math
from tandem.explain.rule_measures import circular, contradictory
from tandem.explain.rules_tree import (check_tree, condition_text, conditions, is_number, path_text, rules_text,
                                       tree_paths)

RULES_FILE = "rules.json"
SCHEMA = "tandem.rules/2"
MODEL_FILE = "model.onnx"  # rules are fit on the fp32 graph, whatever precision the runtime serves
RERUN = "run `tandem rules BUNDLE` again"


# --- the concept layer ------------------------------------------------------------------------------------


def feature_session(model_bytes: bytes, tensor: str, options: Any = None) -> Any:
    """An ONNX Runtime session that can also output an inner tensor (see run_features)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(model_bytes)
    if tensor not in [o.name for o in model.graph.output]:
        model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_features(session: Any, feeds: dict, tensor: str) -> tuple[np.ndarray, np.ndarray]:
    """One run of a feature_session: the logits (the graph's first output) and the inner tensor as it is."""
    logits, features = session.run([session.get_outputs()[0].name, tensor], feeds)
    return logits, features



# --- the rule set ----------------------------------------------------------------------------------------


class RuleSet:
    """Stored rules of one bundle, ready to explain predictions: `explain`, `text`, `prototype_png`."""

    def __init__(self, bundle: Path, manifest: dict, data: dict, session: Any) -> None:
        from tandem.runtime.predictor import Predictor

        self.bundle, self.manifest, self.data = bundle, manifest, data
        self.labels: list[str] = data["labels"]
        self.concepts: list[dict] = data["concepts"]
        self.groups: list[dict] = data["groups"]
        self.metrics: dict = data["metrics"]
        self.fidelity = float(self.metrics["fidelity"])
        self.fit = concept_math.load_concepts(data["concepts_fit"])
        # Each concept's scale for its strongest response: a code map over it reads 0..1 ("where" it fired).
        self.anywhere = self.fit["scale"][::concept_math.FEATURES_PER_CONCEPT]
        self.specific = [c.get("specific", {"specific": False, "index": -1}) for c in self.concepts]
        self.tree = check_tree(data["tree"], len(self.fit["scale"]), len(self.labels), len(self.groups))
        self.predictor = Predictor(session, manifest, precision="fp32")  # preprocessing, labels, image forms
        self.predictor._check_against_the_graph()
        if self.predictor.labels != self.labels:
            raise UserError(f"bundle {bundle}: {RULES_FILE} was fit for other labels than the manifest's; {RERUN}")

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
            raise UserError(f"bundle {bundle}: ONNX Runtime cannot run {MODEL_FILE} with its concept layer "
                            f"exposed ({str(err).splitlines()[0]}); {RERUN}") from None
        return cls(bundle, manifest, data, session)

    def scores_and_predictions(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 (N, H, W, C) -> region scores (N, F), concept code maps (N, K, h, w), the network's logits."""
        from tandem.runtime.preprocess import preprocess

        p = self.predictor
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (p.image_size, p.image_size, p.channels):
            raise UserError(f"rules explain uint8 images of shape (N, {p.image_size}, {p.image_size}, {p.channels}), "
                            f"got {pixels.dtype} {pixels.shape}; convert them with predictor.pixels(...)")
        logits, acts = [], []
        for i in range(0, len(pixels), p.batch_size):
            out = run_features(p.session, {p.input_name: preprocess(pixels[i:i + p.batch_size], p.mean, p.std)},
                               self.data["feature_tensor"])
            logits.append(out[0])
            acts.append(out[1])
        if acts[0].ndim != 4:
            raise UserError(f"bundle {self.bundle}: {self.data['feature_tensor']} is not a spatial layer; {RERUN}")
        x, codes = concept_math.scores(np.concatenate(acts), self.fit)
        return x, codes, np.concatenate(logits)

    def explain(self, pixels: np.ndarray) -> list[dict]:
        """One dict per image: the rules' label and group, the network's label, whether they agree, the
        conditions on its path (one per concept and place, each with its level and `where`: the concept's code
        map in this image scaled to 0..1), a sentence, and the rules' test-split fidelity."""
        x, codes, logits = self.scores_and_predictions(pixels)
        return [self._one(row, code, int(network), path)
                for row, code, network, path in zip(x, codes, logits.argmax(axis=1), tree_paths(x, self.tree))]

    def _one(self, row: np.ndarray, code: np.ndarray, network: int, path: list[int]) -> dict:
        tree, leaf = self.tree, path[-1]
        label, group = tree["class"][leaf], tree["group"][leaf]
        found = conditions(tree, row, path, self.concepts)
        for c in found:
            c["where"] = np.round(np.clip(code[c["concept"]] / self.anywhere[c["concept"]], 0, 1), 3).tolist()
            c["text"] = condition_text(c)
        group_name = self.groups[group]["name"]
        return {
            "label": self.labels[label], "index": int(label), "group": group_name, "group_index": int(group),
            "network_label": self.labels[network], "network_index": network, "agrees": bool(label == network),
            "conditions": found, "text": path_text(found, group_name, self.labels[label], len(self.groups) == 1),
            "circular": circular(found, int(label), self.specific), "contradictory": contradictory(found),
            "fidelity": self.fidelity, "nodes": path,
            "leaf": {"node": leaf, "test_images": tree["test_images"][leaf], "test_agree": tree["test_agree"][leaf]},
        }

    def explain_files(self, paths: list[str]) -> Iterator[tuple[Path, np.ndarray | None, dict | None, str | None]]:
        """(path, pixels, the rule path of explain(), None) per image file (folders searched), (path, None, None,
        error) per unreadable one. The paths are expanded now (a UserError before any output); the images as they
        are decoded, so a folder of any size, and an unreadable file does not stop the rest."""
        from tandem.images import expand_paths

        return self.explain_decoded(expand_paths(paths))

    def explain_decoded(self, files: list[Path]) -> Iterator[tuple[Path, np.ndarray | None, dict | None, str | None]]:
        from tandem.images import decode_file_batches

        p = self.predictor
        chunks = decode_file_batches(files, p.image_size, p.channels, p.resize)
        try:
            for chunk in chunks:
                good = [pixels for _, pixels, _ in chunk if pixels is not None]
                why = iter(self.explain(np.stack(good))) if good else iter(())
                for path, pixels, error in chunk:
                    yield (path, None, None, error) if pixels is None else (path, pixels, next(why), None)
        finally:
            chunks.close()

    def prototype_png(self, concept: int) -> bytes:
        """The concept's prototype strip (the image regions where it fires most), hash-verified."""
        if not isinstance(concept, int) or not 0 <= concept < len(self.concepts):
            raise UserError(f"concept {concept} does not exist; these rules have concepts 0 to "
                            f"{len(self.concepts) - 1}")
        return _read_rules_file(self.bundle, self.manifest, self.concepts[concept]["prototype"])

    def text(self) -> str:
        return rules_text(self.tree, self.concepts, self.labels, [g["name"] for g in self.groups])


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


def _check_data(data: dict) -> None:
    """The shape of rules.json (ValueError/KeyError/TypeError with what is wrong)."""
    for key, kind in (("model_sha256", str), ("feature_tensor", str), ("labels", list), ("concepts", list),
                      ("groups", list), ("concepts_fit", dict), ("tree", dict), ("metrics", dict)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{key} is missing or not a {kind.__name__}")
    if not data["concepts"] or any(not isinstance(c, dict) or type(c.get("id")) is not int
                                   or not isinstance(c.get("name"), str) or not isinstance(c.get("prototype"), str)
                                   for c in data["concepts"]):
        raise ValueError("concepts need an id, a name and a prototype each")
    if not data["groups"] or any(not isinstance(g, dict) or not isinstance(g.get("name"), str)
                                 or not isinstance(g.get("classes"), list) for g in data["groups"]):
        raise ValueError("groups need a name and their classes each")
    fit = concept_math.load_concepts(data["concepts_fit"])
    if fit["components"].shape[0] != len(data["concepts"]):
        raise ValueError("concepts_fit.components has not one row per concept")
    metrics = data["metrics"]
    if any(not is_number(metrics.get(key)) for key in ("fidelity", "accuracy", "leaves", "depth", "test_images")):
        raise ValueError("metrics need fidelity, accuracy, leaves, depth and test_images as numbers")
    if not 0.0 <= metrics["fidelity"] <= 1.0:
        raise ValueError("metrics.fidelity is not between 0 and 1")
    check_tree(data["tree"], len(fit["scale"]), len(data["labels"]), len(data["groups"]))
