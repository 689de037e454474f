"""Rules extracted from the network (`tandem rules`): fidelity on a network whose decision is a planted threshold
on one region of a spatial layer, the torch-free rule path against scikit-learn's own tree walk, rules.json
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
from tandem.explain.rules import RULES_FILE, RuleSet
from tandem.explain.rules_tree import tree_paths

QUIET = {"log": lambda *a, **k: None}


# --- a network with a known rule --------------------------------------------------------------------------

SHIFT = 10.0  # added before the ReLU, so the background is not cut to 0 and every corner has its own mean


def _corner(pixels: np.ndarray, pre: dict) -> np.ndarray:
    """What the planted network's top-left cell holds, in numpy: SHIFT + the mean of the preprocessed image's
    top-left (size/4)^2 block (float64, independent of ONNX Runtime)."""
    x = (pixels[..., 0].astype(np.float64) / 255 - pre["mean"]) / pre["std"]
    k = x.shape[1] // 4
    return x[:, :k, :k].mean(axis=(1, 2)) + SHIFT


@pytest.fixture(scope="module")
def planted(tiny_bundle, tmp_path_factory):
    """A bundle on the tiny bundle's data whose network says 'bright' exactly when the top-left cell of its 4 x 4
    spatial layer (ReLU(x + SHIFT), average-pooled) is above a threshold t: logits = (t - cell, cell - t)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tandem.explain.data import bundle_splits, split_pixels

    manifest = read_manifest(tiny_bundle)
    pre, size = manifest["preprocessing"], manifest["preprocessing"]["image_size"]
    splits = bundle_splits(tiny_bundle, manifest)
    corner = {name: _corner(split_pixels(getattr(splits, name))[0], pre) for name in ("train", "test")}
    ordered = np.unique(corner["train"])
    middle = len(ordered) // 2
    gaps = np.diff(ordered[middle - 20:middle + 20])
    t = float(ordered[middle - 20 + gaps.argmax()] + gaps.max() / 2)  # mid-gap: no image near the threshold
    assert np.abs(corner["test"] - t).min() > 1e-5
    k = size // 4
    pick = np.zeros((16, 2), np.float32)
    pick[0] = [-1, 1]  # the top-left cell of the flattened 4 x 4 grid
    weights = {"shift": np.array(SHIFT, np.float32), "pick": pick, "b": np.array([t, -t], np.float32)}
    nodes = [helper.make_node("Add", ["input", "shift"], ["shifted"]), helper.make_node("Relu", ["shifted"], ["r"]),
             helper.make_node("AveragePool", ["r"], ["cells"], kernel_shape=[k, k], strides=[k, k]),
             helper.make_node("Flatten", ["cells"], ["flat"]), helper.make_node("Gemm", ["flat", "pick", "b"], ["logits"])]
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


def test_the_tree_recovers_a_planted_region_threshold_with_fidelity_one(planted, tmp_path):
    from tandem.explain.concepts import feature_of
    from tandem.explain.data import split_pixels
    from tandem.explain.fit_rules import fit_rules

    folder, t, splits = planted
    bundle = tmp_path / "b"
    shutil.copytree(folder, bundle)
    report = fit_rules(bundle, max_leaves=8, concepts=1, **QUIET)
    pixels, truth = split_pixels(splits.test)
    network = (_corner(pixels, read_manifest(bundle)["preprocessing"]) > t).astype(int)
    assert 0 < network.sum() < len(network)
    assert report["feature_tensor"] == "cells" and report["feature_shape"] == [1, 4, 4]
    tree = report["tree"]
    # One test, on the one concept at the top-left, at the planted threshold (the score is the cell / its scale).
    assert report["leaves"] == 2 and report["depth"] == 1 and feature_of(tree["feature"][0]) == (0, "top-left")
    stored = json.loads((bundle / RULES_FILE).read_text())
    component = stored["concepts_fit"]["components"][0][0]
    scale = stored["concepts_fit"]["scale"][tree["feature"][0]]
    assert tree["threshold"][0] * scale / component == pytest.approx(t, rel=1e-3)
    assert [tree["class"][tree["left"][0]], tree["class"][tree["right"][0]]] == [0, 1]
    assert report["fidelity"] == 1.0 and report["contradictory"] == 0
    assert report["accuracy"] == pytest.approx(np.mean(network == truth), abs=1e-12)
    # The torch-free runtime walks the stored rules to the same answers, and names the condition and where.
    why = RuleSet.load(bundle).explain(pixels)
    assert [w["index"] for w in why] == network.tolist() and all(w["agrees"] for w in why)
    bright = why[int(network.argmax())]
    (condition,) = bright["conditions"]
    assert bright["label"] == "bright" and condition["op"] == ">" and condition["place"] == "top-left"
    assert "at the top-left is strong" in bright["text"]
    assert np.asarray(condition["where"]).shape == (4, 4)


# --- the runtime's rule path against scikit-learn ---------------------------------------------------------


def _as_json(clf) -> dict:
    """A scikit-learn tree in rules.json's layout, node numbers kept (children come after parents there too)."""
    t = clf.tree_
    return {"left": t.children_left.tolist(), "right": t.children_right.tolist(),
            "feature": [int(f) if f >= 0 else -1 for f in t.feature], "threshold": t.threshold.tolist(),
            "class": [int(clf.classes_[v.argmax()]) for v in t.value[:, 0, :]]}


def test_the_rule_path_is_scikit_learns_decision_path():
    from sklearn.tree import DecisionTreeClassifier

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
        tree = _as_json(clf)
        paths = tree_paths(probe, tree)
        assert [tree["class"][p[-1]] for p in paths] == clf.predict(probe).tolist()
        # Node for node: the same tests, the same way.
        sk = clf.decision_path(probe)
        for row, path in enumerate(paths):
            nodes = sk.indices[sk.indptr[row]:sk.indptr[row + 1]]
            theirs = [(int(clf.tree_.feature[a]), float(clf.tree_.threshold[a]), int(b == clf.tree_.children_right[a]))
                      for a, b in zip(nodes, nodes[1:])]
            ours = [(tree["feature"][a], tree["threshold"][a], int(b == tree["right"][a]))
                    for a, b in zip(path, path[1:])]
            assert ours == theirs
        assert max(len(p) for p in paths) > 2


def test_the_concept_layer_is_a_spatial_activation_and_a_wrong_one_is_named():
    from onnx import TensorProto, helper

    from tandem.explain.concepts import concept_layers, find_concept_layer

    nodes = [helper.make_node("Relu", ["x"], ["r1"]), helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2],
                                                                       strides=[2, 2]),
             helper.make_node("Relu", ["p1"], ["r2"]), helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[4, 4],
                                                                        strides=[4, 4]),
             helper.make_node("Flatten", ["p2"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # p2 is 2 x 2: too small for nine regions; the last one that is not is the default.
    assert [name for name, _ in concept_layers(model)] == ["r1", "p1", "r2"]
    assert find_concept_layer(model) == ("r2", (3, 8, 8)) and find_concept_layer(model, "r1")[0] == "r1"
    with pytest.raises(UserError, match="--layer 'p2' is not a spatial activation.*r1 \\(3x16x16\\)"):
        find_concept_layer(model, "p2")
    flat = helper.make_graph([helper.make_node("Relu", ["x"], ["out"])], "mlp",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                             [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 12])])
    with pytest.raises(UserError, match="spatial activation"):
        find_concept_layer(helper.make_model(flat))


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
    first = next(w for w in why if w["conditions"])
    assert first["nodes"][0] == 0 and first["label"] in first["text"] and "concept " in first["text"]
    for w in why:
        for c in w["conditions"]:  # every condition holds for the image it explains
            assert c["above"] is None or c["value"] > c["above"]
            assert c["at_most"] is None or c["value"] <= c["at_most"]
    png = rules.prototype_png(first["conditions"][0]["concept"])
    assert png.startswith(b"\x89PNG")
    assert "concept " in rules.text()


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
            bad["concepts_fit"]["components"][0][0] = value
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
    assert report["schema"] == "tandem.rules/2" and report["concepts"] == 3 and report["leaves"] <= 6
    assert 0 <= report["fidelity"] <= 1 and 0 <= report["accuracy"] <= 1 and report["depth"] >= 1
    assert report["stored"] and "concept " in report["rules"] and report["contradictory"] == 0
    assert (tmp_path / "report" / "rules.txt").read_text().startswith("rules for ")
    assert (tmp_path / "report" / "concepts" / "concept_2.png").is_file()
    first = _listed(bundle)
    assert "concepts/concept_2.png" in first and all(first[k] == v for k, v in before.items())

    # A second run replaces its own files and nothing else.
    proc = run_tandem("rules", str(bundle), "--concepts", "2", "--max-leaves", "4", check=True)
    assert "fidelity" in proc.stdout and "concept " in proc.stdout
    second = _listed(bundle)
    assert "concepts/concept_2.png" not in second and not (bundle / "concepts" / "concept_2.png").exists()
    assert second[RULES_FILE] != first[RULES_FILE] and all(second[k] == v for k, v in before.items())
    assert (bundle / "notes.txt").read_text() == "mine" and "notes.txt" not in second
    read_manifest(bundle)  # verifies

    pixels, _ = split_pixels(bundle_splits(bundle, read_manifest(bundle)).test, np.arange(2))
    for i, image in enumerate(pixels):
        Image.fromarray(image[..., 0]).save(tmp_path / f"{i}.png")
    proc = run_tandem("rules", str(bundle), "--explain", str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--json",
                      "--out", str(tmp_path / "why"), check=True)
    out = json.loads(proc.stdout)
    assert [Path(r["path"]).name for r in out["images"]] == ["0.png", "1.png"]
    assert all(r["label"] in r["text"] for r in out["images"])
    assert [Path(r["picture"]).name for r in out["images"]] == ["0.rules.png", "1.rules.png"]
    assert (tmp_path / "why" / "0.rules.png").read_bytes().startswith(b"\x89PNG")
    _one_line(run_tandem("rules", str(bundle), "--explain", str(tmp_path / "0.png"), "--out", str(tmp_path / "why")),
              "--force")
    # An unreadable file is one line; the files after it are still explained (exit 1, as predict does).
    (tmp_path / "bad.png").write_bytes(b"not an image")
    proc = run_tandem("rules", str(bundle), "--explain", str(tmp_path / "bad.png"), str(tmp_path / "1.png"), "--out",
                      str(tmp_path / "why2"))
    assert proc.returncode == 1 and "bad.png" in proc.stderr and "1.png: " in proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 2
    proc = run_tandem("rules", str(bundle), "--show", check=True)
    assert "concept " in proc.stdout and "groups" in proc.stdout

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
