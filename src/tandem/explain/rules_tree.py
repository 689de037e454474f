"""The stored rule tree (rules.json's "tree"), NumPy only: walking it, checking it, and saying a path in words.

The tree is plain lists indexed by node, children after parents: left, right (-1 at a leaf), feature (the
region feature a node tests: concept * FEATURES_PER_CONCEPT + place), threshold (left when the score is at most
it, as scikit-learn does), class, group (the class group the node belongs to), level (1: the part that tells
the groups apart; 2: the part below it that tells a group's classes apart), and per split the images that reach
each node and the share that agree with the network (train_images/train_agree, test_images/test_agree).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tandem.explain.concepts import feature_of, place_words

TREE_KEYS = ("left", "right", "feature", "threshold", "class", "group", "level", "test_images", "test_agree")


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


def leaf_classes(scores: np.ndarray, tree: dict) -> np.ndarray:
    return np.array([tree["class"][path[-1]] for path in tree_paths(scores, tree)], int)


def path_stats(tree: dict, scores: np.ndarray, predicted: np.ndarray, split: str, groups: list[list[int]]) -> None:
    """Add {split}_images and {split}_agree: per node, the images of the split reaching it and the share whose
    network answer is the node's class (at a first-level node: whose answer is in the node's group)."""
    n = len(tree["left"])
    seen, agree = np.zeros(n, int), np.zeros(n, int)
    members = {g: set(m) for g, m in enumerate(groups)}
    for path, answer in zip(tree_paths(scores, tree), predicted):
        for node in path:
            seen[node] += 1
            if tree["level"][node] == 1 and tree["left"][node] != -1 and members:
                agree[node] += int(int(answer) in members[tree["group"][node]])
            else:
                agree[node] += int(tree["class"][node] == answer)
    tree[f"{split}_images"] = seen.tolist()
    tree[f"{split}_agree"] = [round(int(a) / int(s), 4) if s else 0.0 for a, s in zip(agree, seen)]


def check_tree(tree: Any, features: int, classes: int, groups: int) -> dict:
    """The tree's lists, checked (ValueError with what is wrong): a walk always ends, tests a real feature."""
    if not isinstance(tree, dict) or any(not isinstance(tree.get(k), list) for k in TREE_KEYS):
        raise ValueError(f"tree needs the lists {', '.join(TREE_KEYS)}")
    n = len(tree["left"])
    if n == 0 or any(len(tree[k]) != n for k in TREE_KEYS):
        raise ValueError("the tree's lists differ in length")
    out = {k: list(tree[k]) for k in TREE_KEYS}
    for node in range(n):
        lo, hi = out["left"][node], out["right"][node]
        if type(lo) is not int or type(hi) is not int:
            raise ValueError(f"node {node}'s children are not node numbers")
        if any(not is_number(out[k][node]) for k in ("threshold", "test_images", "test_agree")):
            raise ValueError(f"node {node}'s threshold or test counts are not numbers")
        if (lo == -1) != (hi == -1) or (lo != -1 and not (node < lo < n and node < hi < n)):
            raise ValueError(f"node {node} has bad children")  # children after parents: no loops
        if lo != -1 and not (type(out["feature"][node]) is int and 0 <= out["feature"][node] < features):
            raise ValueError(f"node {node} tests no concept")
        if type(out["class"][node]) is not int or not 0 <= out["class"][node] < classes:
            raise ValueError(f"node {node} has no class")
        if type(out["group"][node]) is not int or not 0 <= out["group"][node] < groups:
            raise ValueError(f"node {node} has no group")
        if out["level"][node] not in (1, 2):
            raise ValueError(f"node {node}'s level is not 1 or 2")
    out["threshold"] = [float(t) for t in out["threshold"]]
    return out


def is_number(value: Any) -> bool:
    return type(value) in (int, float) and abs(value) < 1e300  # finite, and float() of it cannot overflow


# --- a path in words -----------------------------------------------------------------------------------------


def num(x: float) -> str:
    """Two decimals, or two significant digits where two decimals would print a small threshold as 0.00."""
    return f"{x:.2f}" if x == 0 or abs(x) >= 0.005 else f"{x:.2g}"


def conditions(tree: dict, row: np.ndarray, path: list[int], concepts: list[dict]) -> list[dict]:
    """One condition per region feature the path tests: the tightest bound on each side ("above", "at most", or
    "between" when the path bounds it on both), at the level where the path first tests it. A feature is never
    said to be both high and low: two tests of one feature make one interval."""
    found: dict[int, dict] = {}
    for node, child in zip(path, path[1:]):
        f, t = tree["feature"][node], tree["threshold"][node]
        c = found.setdefault(f, {"feature": f, "level": tree["level"][node], "above": None, "at_most": None})
        if child == tree["left"][node]:
            c["at_most"] = t if c["at_most"] is None else min(c["at_most"], t)
        else:
            c["above"] = t if c["above"] is None else max(c["above"], t)
    out = []
    for c in found.values():
        concept, place = feature_of(c["feature"])
        op = "between" if c["above"] is not None and c["at_most"] is not None else (">" if c["above"] is not None
                                                                                   else "<=")
        out.append({**c, "concept": concept, "place": place, "name": concepts[concept]["name"], "op": op,
                    "value": float(row[c["feature"]]), "prototype": concepts[concept]["prototype"]})
    return sorted(out, key=lambda c: (c["level"], c["op"] == "<="))  # per level: what is there, then what is not


def condition_text(c: dict) -> str:
    """'concept 3 (legs: bottom of horse, zebra) at the bottom is strong (0.91 > 0.40)'."""
    what = f"concept {c['concept']} ({c['name']}) {place_words(c['place'])}"
    if c["op"] == ">":
        return f"{what} is strong ({num(c['value'])} > {num(c['above'])})"
    if c["op"] == "<=":
        return f"{what} is weak ({num(c['value'])} <= {num(c['at_most'])})"
    return f"{what} is moderate ({num(c['above'])} < {num(c['value'])} <= {num(c['at_most'])})"


def path_text(found: list[dict], group: str, label: str, single_group: bool) -> str:
    """'the cat / dog group, because ...; within it, cat, because ...'."""
    first = [condition_text(c) for c in found if c["level"] == 1]
    second = [condition_text(c) for c in found if c["level"] == 2]
    head = f"the {group} group" + (f", because {' and '.join(first)}" if first else "")
    tail = f"{label}" + (f", because {' and '.join(second)}" if second else "")
    return tail if single_group else f"{head}; within it, {tail}"


def rules_text(tree: dict, concepts: list[dict], labels: list[str], groups: list[str], indent: str = "    ") -> str:
    """The tree as indented IF-THEN rules, the "strong" branch first; a first-level leaf names its group, a leaf
    its class with its test-split agreement."""
    lines: list[str] = []

    def leaf(node: int) -> str:
        n, agree = tree["test_images"][node], tree["test_agree"][node]
        seen = f"{n} test image{'s' if n != 1 else ''}, {agree:.0%} agree" if n else "no test images"
        return f"{labels[tree['class'][node]]}  ({seen})"

    def test(node: int) -> str:
        concept, place = feature_of(tree["feature"][node])
        return (f"concept {concept} ({concepts[concept]['name']}) {place_words(place)} > "
                f"{num(tree['threshold'][node])}")

    def walk(node: int, depth: int, keyword: str = "if") -> None:
        pad = indent * depth
        parent_level = tree["level"][node]
        if tree["left"][node] == -1:
            lines.append(pad + leaf(node))
            return
        lines.append(f"{pad}{keyword} {test(node)}:")
        for child, otherwise in ((tree["right"][node], False), (tree["left"][node], True)):
            crossing = tree["level"][child] == 2 and parent_level == 1  # into a group's own rules
            if otherwise and not crossing and tree["left"][child] != -1:
                walk(child, depth, "elif")  # a chain of tests reads as if / elif / elif, not ever deeper
                continue
            if otherwise:
                lines.append(f"{pad}else:")
            if crossing:
                lines.append(f"{pad}{indent}-> the {groups[tree['group'][child]]} group:")
            walk(child, depth + (2 if crossing else 1))

    if tree["level"][0] == 2:
        lines.append(f"-> the {groups[tree['group'][0]]} group:")
        walk(0, 1)
    else:
        walk(0, 0)
    return "\n".join(lines)
