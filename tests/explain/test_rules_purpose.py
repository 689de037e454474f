"""Issue 19's rules half: a path never calls one concept both strong and weak, the measures of purpose count
what they say, the rules are hierarchical, and concepts are shown by regions."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tandem.explain import rule_measures as measures
from tandem.explain.concepts import FEATURES_PER_CONCEPT, WHERE, concept_codes, region_features
from tandem.explain.rules_tree import condition_text, conditions, path_text

QUIET = {"log": lambda *a, **k: None}


def _tree(features: list[int], thresholds: list[float]) -> dict:
    """A chain: node i tests features[i] > thresholds[i] (right) or not (left, a leaf of class 0)."""
    n = len(features)
    tree = {"left": [], "right": [], "feature": [], "threshold": [], "class": [], "level": [], "group": []}
    for i in range(n):  # node 2i tests, 2i+1 is its left leaf, 2i+2 the next test (or the last leaf)
        tree["left"] += [2 * i + 1, -1]
        tree["right"] += [2 * i + 2, -1]
        tree["feature"] += [features[i], -1]
        tree["threshold"] += [thresholds[i], 0.0]
        tree["class"] += [1, 0]
        tree["level"] += [1 if i == 0 else 2, 2]
        tree["group"] += [0, 0]
    for k in ("left", "right", "feature", "threshold", "class", "level", "group"):
        tree[k].append({"left": -1, "right": -1, "feature": -1, "threshold": 0.0, "class": 1, "level": 2,
                        "group": 0}[k])
    return tree


def test_one_feature_tested_twice_on_a_path_is_one_interval_never_strong_and_weak():
    """Main merged the bounds per side and printed 'concept 9 is high ... and concepts ..., 9 ... are low'."""
    concepts = [{"name": f"c{k}", "prototype": f"concepts/concept_{k}.png"} for k in range(3)]
    f0, f1 = 0, FEATURES_PER_CONCEPT + WHERE.index("top-left")  # concept 0 anywhere, concept 1 at the top-left
    tree = _tree([f0, f1, f0], [0.2, 0.5, 0.6])
    row = np.zeros(3 * FEATURES_PER_CONCEPT)
    row[f0], row[f1] = 0.4, 0.9
    # 0.4 > 0.2 (right), 0.9 > 0.5 (right), 0.4 <= 0.6 (left, a leaf)
    path = [0, 2, 4, 5]
    found = conditions(tree, row, path, concepts)
    assert [(c["concept"], c["place"], c["op"]) for c in found] == [(0, "anywhere", "between"), (1, "top-left", ">")]
    assert found[0]["above"] == 0.2 and found[0]["at_most"] == 0.6
    assert not measures.contradictory(found)
    text = path_text(found, "a / b", "b", single_group=False)
    assert "concept 0 (c0) anywhere is moderate (0.20 < 0.40 <= 0.60)" in text
    assert text.count("concept 0 ") == 1 and "0.90 > 0.50" in text  # every condition keeps its value
    assert text.startswith("the a / b group, because concept 0") and "; within it, b, because concept 1" in text
    # The measure itself catches the old sentence: one concept at one place on both sides.
    assert measures.contradictory([{"concept": 9, "place": "anywhere", "op": ">"},
                                   {"concept": 9, "place": "anywhere", "op": "<="}])


def test_the_measures_count_class_detectors_specific_and_circular_concepts():
    rng = np.random.default_rng(0)
    n = 400
    logits = rng.normal(size=(n, 3))
    anywhere = np.stack([logits[:, 1] + 0.05 * rng.normal(size=n), rng.random(n)], axis=1)  # 0 copies class 1
    found = measures.logit_correlations(anywhere, logits, ["a", "b", "c"])
    assert found[0]["label"] == "b" and found[0]["r"] > 0.99 and found[1]["r"] < 0.3
    # Concept 0 fires only on images the network calls class 2; concept 1 on every class alike.
    predicted = np.arange(n) % 3
    codes = rng.random((n, 2, 4, 4)) * 0.1
    codes[predicted == 2, 0, 1, 2] = 5.0
    codes[:, 1, 3, 0] = rng.random(n) + 1
    specific = measures.specificity(codes, predicted, ["a", "b", "c"])
    assert specific[0] == {"label": "c", "index": 2, "share": 1.0, "specific": True}
    assert not specific[1]["specific"]
    assert measures.top_regions(codes, 0, 3)[0][1:] == (1, 2)
    only_0 = [{"concept": 0, "place": "anywhere", "op": ">"}]
    assert measures.circular(only_0, 2, specific) and not measures.circular(only_0, 1, specific)
    assert not measures.circular(only_0 + [{"concept": 1, "place": "left", "op": "<="}], 2, specific)
    assert not measures.circular([], 2, specific)


def test_codes_are_the_non_negative_mix_and_regions_read_where():
    rng = np.random.default_rng(1)
    components = np.abs(rng.normal(size=(3, 6)))
    mix = np.zeros((2, 3, 4, 4))
    mix[0, 1, 0, 0] = 2.0   # concept 1 at the top-left of image 0
    mix[1, 2, 3, 3] = 1.5   # concept 2 at the bottom-right of image 1
    activations = np.einsum("nkhw,kc->nchw", mix, components)
    codes = concept_codes(activations, components)
    np.testing.assert_allclose(codes, mix, atol=1e-3)
    x = region_features(codes).reshape(2, 3, FEATURES_PER_CONCEPT)
    assert x[0, 1, WHERE.index("top-left")] == pytest.approx(2.0, abs=1e-3)
    assert x[0, 1, WHERE.index("bottom-right")] == pytest.approx(0.0, abs=1e-3)
    assert x[1, 2, WHERE.index("bottom-right")] == pytest.approx(1.5, abs=1e-3)
    assert x[1, 2, WHERE.index("overall")] == pytest.approx(1.5 / 16, abs=1e-3)


@pytest.fixture(scope="module")
def fitted(small_npz, tmp_path_factory):
    """A small cnn trained long enough to tell the ten animals apart (the session's tiny run answers one or two
    classes: nothing to group), with rules fit on it."""
    from tandem.config import TrainConfig
    from tandem.explain.fit_rules import fit_rules
    from tandem.export.onnx_bundle import export_bundle
    from tandem.train.loop import train

    out = tmp_path_factory.mktemp("purpose")
    cfg = TrainConfig.model_validate({"data": {"source": str(small_npz)}, "model": {"width": 8}, "epochs": 12,
                                      "batch_size": 32, "out_dir": str(out / "run"), "progress": False})
    run = train(cfg, log=lambda *a, **k: None)
    bundle = export_bundle(run.run_dir, out / "bundle", log=lambda *a, **k: None)
    return bundle, fit_rules(bundle, max_leaves=16, concepts=6, groups=3, **QUIET)


def test_rules_of_a_real_network_are_two_levels_of_parts(fitted):
    """Concepts come from a spatial layer (not the penultimate vector the head reads), classes are grouped, every
    explanation is a path group -> class, none contradictory, and the report's counts are the runtime's."""
    from tandem.explain.data import bundle_splits, split_pixels
    from tandem.explain.rules import RuleSet

    bundle, report = fitted
    c, h, w = report["feature_shape"]
    assert h >= 3 and w >= 3 and report["levels"] == 2 and len(report["groups_list"]) >= 2
    assert all(len(g["classes"]) >= 2 for g in report["groups_list"])  # no class is a group alone
    assert sorted(i for g in report["groups_list"] for i in g["classes"]) == list(range(10))
    assert report["leaves"] <= 16 and report["contradictory"] == 0
    rules = RuleSet.load(bundle)
    pixels, _ = split_pixels(bundle_splits(bundle, rules.manifest).test)
    why = rules.explain(pixels)
    assert sum(w["circular"] for w in why) == report["circular"]
    assert not any(w["contradictory"] for w in why)
    for one in why:
        group = next(g for g in report["groups_list"] if g["name"] == one["group"])
        assert one["text"].startswith(f"the {one['group']} group")
        assert [c["level"] for c in one["conditions"]] == sorted(c["level"] for c in one["conditions"])
        assert one["group_index"] == group["id"]
    assert "-> the " in rules.text()


def test_prototypes_are_regions_and_an_explanation_has_a_picture_per_condition(fitted):
    from PIL import Image

    from tandem.explain.data import bundle_splits, split_pixels
    from tandem.explain.rules import RuleSet
    from tandem.explain.rules_pictures import crop_box, explanation_png

    bundle, report = fitted
    rules = RuleSet.load(bundle)
    size = rules.predictor.image_size
    assert crop_box(0, 0, (4, 4), (size, size)) == (0, 0, size // 2, size // 2)
    strip = Image.open(io.BytesIO(rules.prototype_png(0)))
    zoom = max(1, 96 // (size // 2))
    assert strip.height == (size // 2) * zoom + 22  # crops of half the image, not whole images
    pixels, _ = split_pixels(bundle_splits(bundle, rules.manifest).test, np.arange(3))
    for image, one in zip(pixels, rules.explain(pixels)):
        picture = Image.open(io.BytesIO(explanation_png(image, one)))
        tiles = len(one["conditions"])
        assert picture.height >= (tiles + 1) * size * (96 // size)
        for c in one["conditions"]:
            assert condition_text(c) in one["text"]
