"""Rules extracted from the network (`tandem rules`): fidelity against hand-counted references on a network
whose decision is a planted threshold, the torch-free rule path against scikit-learn's own tree walk, rules.json
hashed like every file, and the command as a user meets it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import run_tandem
from tandem.bundle import read_manifest, sha256_file, write_manifest
from tandem.errors import UserError
from tandem.explain.rules import RULES_FILE, RuleSet, feature_session, find_readout, tree_paths

QUIET = {"log": lambda *a, **k: None}


# --- a network with a known rule --------------------------------------------------------------------------


def _halves(pixels: np.ndarray, pre: dict) -> np.ndarray:
    """What the planted network computes, in numpy: 1 + the mean of the left and of the right half of the
    preprocessed image (float64, independent of ONNX Runtime)."""
    x = (pixels[..., 0].astype(np.float64) / 255 - pre["mean"]) / pre["std"]
    half = x.shape[2] // 2
    return np.stack([x[:, :, :half].mean(axis=(1, 2)), x[:, :, half:].mean(axis=(1, 2))], axis=1) + 1


@pytest.fixture(scope="module")
def planted(tiny_bundle, tmp_path_factory):
    """A bundle on the tiny bundle's data whose network says 'bright' exactly when the left half of the image is
    brighter than a threshold t: penultimate layer f = (left, right) half means + 1, logits = (t - f0, f0 - t)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tandem.explain.data import bundle_splits, split_pixels

    manifest = read_manifest(tiny_bundle)
    pre, size = manifest["preprocessing"], manifest["preprocessing"]["image_size"]
    splits = bundle_splits(tiny_bundle, manifest)
    left = {name: _halves(split_pixels(getattr(splits, name))[0], pre)[:, 0] for name in ("train", "test")}
    ordered = np.sort(left["train"])
    middle = len(ordered) // 2
    gaps = np.diff(ordered[middle - 40:middle + 40])
    t = float(ordered[middle - 40 + gaps.argmax()] + gaps.max() / 2)  # mid-gap: no image near the threshold
    assert np.abs(left["test"] - t).min() > 1e-4

    cols = np.arange(size * size) % size
    halves = np.zeros((size * size, 2), np.float32)
    halves[cols < size // 2, 0] = 1 / (size * (size // 2))
    halves[cols >= size // 2, 1] = 1 / (size * (size - size // 2))
    weights = {"halves": halves, "one": np.ones(2, np.float32), "w": np.array([[-1, 1], [0, 0]], np.float32),
               "b": np.array([t, -t], np.float32)}
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "halves"], ["m"]),
             helper.make_node("Add", ["m", "one"], ["features"]),
             helper.make_node("Gemm", ["features", "w", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "planted", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              ["N", 1, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = tmp_path_factory.mktemp("planted") / "bundle"
    folder.mkdir()
    onnx.save(model, folder / "model.onnx")
    keep = {k: v for k, v in manifest.items() if k != "files"}
    write_manifest(folder, {**keep, "labels": ["dark", "bright"],
                            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]})
    return folder, t, splits


def test_the_tree_recovers_a_planted_threshold_with_fidelity_one(planted, tmp_path):
    from tandem.explain.data import split_pixels
    from tandem.explain.fit_rules import fit_rules

    folder, t, splits = planted
    bundle = tmp_path / "b"
    shutil.copytree(folder, bundle)
    report = fit_rules(bundle, max_leaves=8, concepts=1, **QUIET)
    pixels, truth = split_pixels(splits.test)
    network = (_halves(pixels, read_manifest(bundle)["preprocessing"])[:, 0] > t).astype(int)
    assert 0 < network.sum() < len(network)
    tree = report["tree"]
    # One test, on the one concept, at the planted threshold: the concept's score is f0 / scale.
    assert report["leaves"] == 2 and report["depth"] == 1 and tree["feature"][0] == 0
    rules = json.loads((bundle / RULES_FILE).read_text())
    direction = np.asarray(rules["scores"]["directions"], np.float32).astype(np.float64)[0]
    assert direction[1] == 0 and tree["threshold"][0] == pytest.approx(t * direction[0], rel=0.01)
    assert [tree["class"][tree["left"][0]], tree["class"][tree["right"][0]]] == [0, 1]
    assert report["fidelity"] == 1.0
    assert report["accuracy"] == pytest.approx(np.mean(network == truth), abs=1e-12)
    assert report["network_accuracy"] == report["accuracy"]
    # The torch-free runtime walks the stored rules to the same answers, and names the condition.
    why = RuleSet.load(bundle).explain(pixels)
    assert [w["index"] for w in why] == network.tolist() and all(w["agrees"] for w in why)
    bright = why[int(network.argmax())]
    assert bright["label"] == "bright" and bright["conditions"][0]["op"] == ">" and "is high" in bright["text"]


def test_fidelity_counts_the_disagreements_by_hand(planted, tmp_path):
    """Concepts of the whole activation mix both halves, so one split cannot follow the network exactly: the
    reported fidelity and accuracy equal the counts made here from the stored direction and threshold."""
    from tandem.explain.data import split_pixels
    from tandem.explain.fit_rules import fit_rules

    folder, t, splits = planted
    bundle = tmp_path / "b"
    shutil.copytree(folder, bundle)
    report = fit_rules(bundle, max_leaves=2, concepts=1, space="all", **QUIET)
    stored = json.loads((bundle / RULES_FILE).read_text())
    direction = np.asarray(stored["scores"]["directions"], np.float32).astype(np.float64)[0]
    assert direction.min() > 0  # both halves
    pixels, truth = split_pixels(splits.test)
    f = _halves(pixels, read_manifest(bundle)["preprocessing"])
    network = (f[:, 0] > t).astype(int)
    tree = stored["tree"]
    high = (f @ direction).astype(np.float32) > tree["threshold"][0]
    rules = np.where(high, tree["class"][tree["right"][0]], tree["class"][tree["left"][0]])
    disagreements = int((rules != network).sum())
    assert 0 < disagreements < len(network) // 2
    assert report["fidelity"] == pytest.approx(1 - disagreements / len(network), abs=1e-12)
    assert report["accuracy"] == pytest.approx(np.mean(rules == truth), abs=1e-12)
    assert stored["metrics"]["fidelity"] == report["fidelity"]


# --- the runtime's rule path against scikit-learn ---------------------------------------------------------


def test_the_rule_path_is_scikit_learns_decision_path():
    from sklearn.tree import DecisionTreeClassifier

    from tandem.explain.fit_rules import _tree_json

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5))
    y = (x[:, 0] > 0.3).astype(int) + 2 * (x[:, 1] * x[:, 2] > 0.1) + (x[:, 3] > 1.2)
    for leaves in (3, 12, 40):
        clf = DecisionTreeClassifier(max_leaf_nodes=leaves, random_state=0).fit(x, y)
        inner = clf.tree_.feature >= 0
        # Rows exactly on each threshold and one float32 step either side: where float32/float64 handling shows.
        edge = np.repeat(x[:1], 3 * inner.sum(), axis=0)
        for i, (feature, threshold) in enumerate(zip(clf.tree_.feature[inner], clf.tree_.threshold[inner])):
            t32 = np.float32(threshold)
            edge[3 * i:3 * i + 3, feature] = [threshold, np.nextafter(t32, np.float32(-9)), np.nextafter(t32, 9)]
        probe = np.vstack([x, edge, rng.normal(size=(200, 5))])
        tree = _tree_json(clf, probe, clf.predict(probe))
        paths = tree_paths(probe, tree)
        assert [tree["class"][p[-1]] for p in paths] == clf.predict(probe).tolist()
        # Node for node: the same tests, the same way, as far as the stored tree goes (it drops tests whose both
        # sides give one class, so its path may stop early).
        sk = clf.decision_path(probe)
        for row, path in enumerate(paths):
            nodes = sk.indices[sk.indptr[row]:sk.indptr[row + 1]]
            theirs = [(int(clf.tree_.feature[a]), float(clf.tree_.threshold[a]), int(b == clf.tree_.children_right[a]))
                      for a, b in zip(nodes, nodes[1:])]
            ours = [(tree["feature"][a], tree["threshold"][a], int(b == tree["right"][a]))
                    for a, b in zip(path, path[1:])]
            assert ours == theirs[:len(ours)]
        assert max(len(p) for p in paths) > 2


def test_find_readout_reads_the_last_layer_of_any_head():
    """Gemm with transB and alpha, MatMul + bias, a softmax after: the penultimate tensor and its weights give
    back the graph's own logits."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(12, 6)).astype(np.float32)
    w2 = rng.normal(size=(6, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    heads = {
        "gemm": ([helper.make_node("Gemm", ["h", "w2t", "b"], ["out"], transB=1, alpha=2.0)], 2.0),
        "matmul": ([helper.make_node("MatMul", ["h", "w2"], ["z"]), helper.make_node("Add", ["z", "b"], ["out"])], 1.0),
        "softmax": ([helper.make_node("Gemm", ["h", "w2", "b"], ["z"]),
                     helper.make_node("Softmax", ["z"], ["out"], axis=1)], 1.0),
    }
    x = rng.normal(size=(7, 12)).astype(np.float32)
    for name, (head, alpha) in heads.items():
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["h"]), *head]
        inits = [numpy_helper.from_array(v, k) for k, v in {"w1": w1, "w2": w2, "w2t": w2.T.copy(), "b": bias}.items()]
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        readout = find_readout(model)
        assert readout.tensor == "h", name
        np.testing.assert_allclose(readout.weight, alpha * w2, rtol=1e-6)
        out, h = feature_session(model.SerializeToString(), readout.tensor, ort.SessionOptions()).run(None, {"x": x})
        logits = h @ readout.weight + bias
        expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True) if name == "softmax" else logits
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    conv_last = helper.make_graph([helper.make_node("Relu", ["x"], ["out"])], "no-head",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 12])])
    with pytest.raises(UserError, match="last layer"):
        find_readout(helper.make_model(conv_last))


# --- a real network: stored, hashed, applied torch-free ---------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tiny_bundle, tmp_path_factory):
    from tandem.explain.fit_rules import fit_rules

    bundle = tmp_path_factory.mktemp("fitted") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    return bundle, fit_rules(bundle, max_leaves=12, concepts=4, **QUIET)


def test_the_runtime_reproduces_the_fidelity_it_was_fit_with(fitted):
    from tandem.explain.data import bundle_splits, split_pixels

    bundle, report = fitted
    manifest = read_manifest(bundle)  # every file verifies, the new ones too
    assert {RULES_FILE, *(f"concepts/concept_{k}.png" for k in range(4))} <= set(manifest["files"])
    rules = RuleSet.load(bundle)
    pixels, _ = split_pixels(bundle_splits(bundle, manifest).test)
    why = rules.explain(pixels)
    assert np.mean([w["agrees"] for w in why]) == pytest.approx(report["fidelity"], abs=1e-12)
    assert all(w["fidelity"] == report["fidelity"] for w in why)
    assert 2 <= report["leaves"] <= 12 and report["depth"] >= 1
    first = why[0]
    assert first["nodes"][0] == 0 and first["text"].startswith(first["label"] + ", because concept ")
    for c in first["conditions"]:
        assert (c["value"] > c["threshold"]) == (c["op"] == ">")
    png = rules.prototype_png(first["conditions"][0]["concept"])
    assert png.startswith(b"\x89PNG")
    assert rules.text().startswith("if concept ")


def test_a_tampered_rules_json_is_refused(fitted, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(fitted[0], bundle)
    data = json.loads((bundle / RULES_FILE).read_text())
    data["tree"]["threshold"][0] += 1.0
    (bundle / RULES_FILE).write_text(json.dumps(data, indent=1) + "\n")
    with pytest.raises(UserError, match=f"{RULES_FILE} does not match its"):
        RuleSet.load(bundle)
    # Rules fit on another model (rehashed, so the file itself verifies) are refused too.
    data["tree"]["threshold"][0] -= 1.0
    data["model_sha256"] = "0" * 64
    (bundle / RULES_FILE).write_text(json.dumps(data))
    manifest = read_manifest(bundle, verify=False)
    manifest["files"][RULES_FILE] = {"sha256": sha256_file(bundle / RULES_FILE),
                                     "bytes": (bundle / RULES_FILE).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="another model.onnx"):
        RuleSet.load(bundle)
    # A rules.json of the wrong types (a float child, a text count), rehashed so that it verifies: refused in words;
    # so are a NaN (json reads it), a number too large for a float, a concept without its id.
    def spoil(key: str, value) -> dict:
        bad = json.loads(json.dumps(data))
        bad["model_sha256"] = read_manifest(fitted[0])["files"]["model.onnx"]["sha256"]
        if key == "direction":
            bad["scores"]["directions"][0][0] = value
        elif key == "id":
            del bad["concepts"][0]["id"]
        else:
            bad["tree"][key][0] = value
        return bad

    for key, value, words in (("left", 1.0, "node 0"), ("test_images", "many", "node 0"),
                              ("test_images", 10 ** 400, "node 0"), ("direction", float("nan"), "NaN"),
                              ("id", None, "an id")):
        (bundle / RULES_FILE).write_text(json.dumps(spoil(key, value)))
        manifest["files"][RULES_FILE] = {"sha256": sha256_file(bundle / RULES_FILE),
                                         "bytes": (bundle / RULES_FILE).stat().st_size}
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(UserError, match=words):
            RuleSet.load(bundle)
    # A bundle whose manifest lists no rules.json has no rules, whatever lies in the folder.
    del manifest["files"][RULES_FILE]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert RuleSet.load(bundle) is None


def test_applying_rules_imports_no_torch_and_no_sklearn(fitted):
    import subprocess
    import sys

    probe = "\n".join([
        "import sys, numpy as np",
        "from tandem.explain.rules import RuleSet",
        f"r = RuleSet.load({str(fitted[0])!r})",
        "p = r.predictor",
        "r.explain(np.zeros((2, p.image_size, p.image_size, p.channels), np.uint8))",
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'sklearn')]",
        "assert not bad, bad",
        "print('ok')"])
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


# --- the command ------------------------------------------------------------------------------------------


def _one_line(proc, expected: str) -> None:
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def _listed(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["files"]


@pytest.mark.slow
def test_the_command_fits_stores_replaces_and_explains(tiny_bundle, tmp_path):
    from PIL import Image

    from tandem.explain.data import bundle_splits, split_pixels

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "notes.txt").write_text("mine")  # not the bundle's: left alone, never listed
    before = _listed(bundle)
    proc = run_tandem("rules", str(bundle), "--concepts", "3", "--max-leaves", "6", "--json", "--out",
                      str(tmp_path / "report"), check=True)
    report = json.loads(proc.stdout)
    assert report["schema"] == "tandem.rules/1" and report["concepts"] == 3 and report["leaves"] <= 6
    assert 0 <= report["fidelity"] <= 1 and 0 <= report["accuracy"] <= 1 and report["depth"] >= 1
    assert report["stored"] and report["rules"].startswith("if concept ")
    assert (tmp_path / "report" / "rules.txt").read_text().startswith("rules for ")
    assert (tmp_path / "report" / "concepts" / "concept_2.png").is_file()
    first = _listed(bundle)
    assert "concepts/concept_2.png" in first and all(first[k] == v for k, v in before.items())

    # A second run replaces its own files and nothing else.
    proc = run_tandem("rules", str(bundle), "--concepts", "2", "--max-leaves", "4", check=True)
    assert "fidelity" in proc.stdout and "if concept " in proc.stdout
    second = _listed(bundle)
    assert "concepts/concept_2.png" not in second and not (bundle / "concepts" / "concept_2.png").exists()
    assert second[RULES_FILE] != first[RULES_FILE] and all(second[k] == v for k, v in before.items())
    assert (bundle / "notes.txt").read_text() == "mine" and "notes.txt" not in second
    read_manifest(bundle)  # verifies

    pixels, _ = split_pixels(bundle_splits(bundle, read_manifest(bundle)).test, np.arange(2))
    for i, image in enumerate(pixels):
        Image.fromarray(image[..., 0]).save(tmp_path / f"{i}.png")
    proc = run_tandem("rules", str(bundle), "--explain", str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--json",
                      check=True)
    out = json.loads(proc.stdout)
    assert [Path(r["path"]).name for r in out["images"]] == ["0.png", "1.png"]
    assert all(r["text"].startswith(r["label"]) for r in out["images"])
    # An unreadable file is one line; the files after it are still explained (exit 1, as predict does).
    (tmp_path / "bad.png").write_bytes(b"not an image")
    proc = run_tandem("rules", str(bundle), "--explain", str(tmp_path / "bad.png"), str(tmp_path / "1.png"))
    assert proc.returncode == 1 and "bad.png" in proc.stderr and "1.png: " in proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 2
    proc = run_tandem("rules", str(bundle), "--show", check=True)
    assert "if concept " in proc.stdout

    # --out: a file is refused before the bundle changes; a folder holding a report needs --force, and its
    # earlier strips go
    stored = _listed(bundle)
    (tmp_path / "a-file.png").write_bytes(b"x")
    proc = run_tandem("rules", str(bundle), "--concepts", "2", "--out", str(tmp_path / "a-file.png"))
    _one_line(proc, "is a file")
    assert _listed(bundle) == stored
    proc = run_tandem("rules", str(bundle), "--concepts", "2", "--no-store", "--out", str(tmp_path / "report"))
    _one_line(proc, "already holds a report")
    run_tandem("rules", str(bundle), "--concepts", "2", "--max-leaves", "4", "--no-store", "--force", "--out",
               str(tmp_path / "report"), check=True)
    assert sorted(p.name for p in (tmp_path / "report" / "concepts").iterdir()) == ["concept_0.png", "concept_1.png"]
    assert _listed(bundle) == stored


@pytest.mark.slow
def test_the_command_refuses_in_one_line(tiny_bundle, tmp_path):
    from tandem.bundle import generate_signing_key, sign_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    _one_line(run_tandem("rules", str(bundle), "--explain", str(bundle / "model.onnx")), "has no rules yet")
    _one_line(run_tandem("rules", str(bundle), "--show", "--max-leaves", "4"), "--max-leaves")
    _one_line(run_tandem("rules", str(tmp_path / "missing")), "does not exist")

    gone = tmp_path / "gone"  # its data is no longer there
    shutil.copytree(tiny_bundle, gone)
    manifest = json.loads((gone / "manifest.json").read_text())
    manifest["config"]["data"]["source"] = str(tmp_path / "moved.npz")
    (gone / "manifest.json").write_text(json.dumps(manifest))
    _one_line(run_tandem("rules", str(gone)), "cannot be read")

    generate_signing_key(tmp_path / "key.pem", tmp_path / "key.pub")
    sign_bundle(bundle, tmp_path / "key.pem")
    before = _listed(bundle)
    _one_line(run_tandem("rules", str(bundle), "--concepts", "2"), "--sign KEY.pem")
    assert _listed(bundle) == before and not (bundle / RULES_FILE).exists()
    run_tandem("rules", str(bundle), "--concepts", "2", "--max-leaves", "4", "--sign", str(tmp_path / "key.pem"),
               check=True)
    from tandem.bundle import verify_bundle_signature

    verify_bundle_signature(bundle, tmp_path / "key.pub")  # signed again, rules included
    assert RULES_FILE in _listed(bundle)


def test_a_read_only_bundle_is_refused_before_the_work(tiny_bundle):
    """Run as a user who cannot write the bundle (root writes anywhere, so as root the command runs as nobody)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="tandem-ro-"))
    try:
        folder.chmod(0o755)
        bundle = folder / "bundle"
        shutil.copytree(tiny_bundle, bundle)
        # the training data too, where that user can read it (pytest's own folders are private to root)
        manifest = json.loads((bundle / "manifest.json").read_text())
        shutil.copy(manifest["config"]["data"]["source"], folder / "small.npz")
        manifest["config"]["data"]["source"] = str(folder / "small.npz")
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        (folder / "small.npz").chmod(0o644)
        for path in [bundle, *bundle.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        command = [*as_user, sys.executable, "-m", "tandem", "rules", str(bundle), "--concepts", "2", "--max-leaves", "4"]
        env = {**os.environ, "HOME": str(folder), "TMPDIR": str(folder) if not as_user else "/tmp"}
        refused = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert refused.returncode != 0 and "read-only" in refused.stderr and "--no-store" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
        printed = subprocess.run([*command, "--no-store", "--json"], capture_output=True, text=True, timeout=300, env=env)
        assert printed.returncode == 0, printed.stderr
        assert json.loads(printed.stdout)["stored"] is False and RULES_FILE not in _listed(bundle)
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755)
        shutil.rmtree(folder)
