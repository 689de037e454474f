"""Hierarchical rules (needs scikit-learn and SciPy): classes grouped by the concepts they share, a first tree that
tells the groups apart, and below each of its leaves a second tree that tells the classes of that part apart.

    groups = class_groups(x_train, p_train, classes=10)             # [[0, 4], [1, 2, 7], ...]
    tree = fit_hierarchy(x_train, p_train, groups, max_leaves=32)   # one tree, nodes marked level 1 or 2

The groups come from the network's own representation: each class's mean concept profile (over the training
images the network calls that class), clustered by average linkage on cosine distance (SciPy). The first level
is a decision tree from the concept scores to the group of the network's answer; each of its leaves gets its
own tree to the answer itself, fit on the training images that reach the leaf. The leaves are shared out by
dynamic programming over each subtree's training agreement at every size, so the whole tree has at most
`max_leaves` leaves and agrees with the network on as many training images as that budget allows.
"""

from __future__ import annotations

import numpy as np

KEYS = ("left", "right", "feature", "threshold", "class", "group", "level")


def default_groups(classes: int) -> int:
    """About the square root of the classes (3 for the ten animals), at least 2, at most classes - 1."""
    return max(2, min(classes - 1, round(classes ** 0.5)))


def class_groups(x_train: np.ndarray, p_train: np.ndarray, classes: int, groups: int | None = None) -> list[list[int]]:
    """Classes the network represents alike, by their mean concept profile (over the training images it calls
    each class); no group of one class while there are other groups."""
    from scipy.cluster.hierarchy import fcluster, linkage

    count = default_groups(classes) if groups is None else groups
    profile = np.zeros((classes, x_train.shape[1]))
    for c in range(classes):
        seen = p_train == c
        if seen.any():
            profile[c] = x_train[seen].mean(axis=0)
    profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-12)  # the mix of concepts, not how much
    profile += 1e-6  # a class never predicted has no profile; cosine distance to it must still be a number
    labels = fcluster(linkage(profile, method="average", metric="cosine"), t=count, criterion="maxclust")
    found = [[int(c) for c in np.flatnonzero(labels == g)] for g in np.unique(labels)]
    # A class alone would be told apart from every other by its own concepts only: it joins the group it is
    # nearest to (mean cosine similarity of the profiles), so that its rule says what it shares, then what not.
    while len(found) > 1 and min(len(g) for g in found) == 1:
        alone = next(g for g in found if len(g) == 1)
        others = [g for g in found if g is not alone]
        near = max(others, key=lambda g: float((profile[g] @ profile[alone[0]]).mean()))
        near.extend(alone)
        found = others
    return sorted((sorted(g) for g in found), key=lambda members: members[0])


def fit_hierarchy(x_train: np.ndarray, p_train: np.ndarray, groups: list[list[int]], max_leaves: int,
                  min_samples_leaf: int, smaller: tuple[int, ...] = (), seed: int = 0,
                  first_per_group: int = 1) -> dict[int, dict]:
    """The two-level tree as JSON (see rules_tree): left, right, feature, threshold, class, group and level per
    node, children after parents (rules_tree.path_stats adds how many images reach each node and agree).
    Returns {leaves: tree} for max_leaves and each of `smaller` that the first level leaves room for (the same
    first level, the leaves shared out again)."""
    from sklearn.tree import DecisionTreeClassifier

    group_of = np.zeros(max(max(g) for g in groups) + 1, int)
    for g, members in enumerate(groups):
        group_of[members] = g
    first_leaves = min(first_per_group * len(groups), max(1, max_leaves // 2))
    top = DecisionTreeClassifier(max_leaf_nodes=max(2, first_leaves), min_samples_leaf=min_samples_leaf,
                                 random_state=seed).fit(x_train, group_of[p_train])
    reach = top.apply(x_train)
    leaves = [int(n) for n in np.flatnonzero(top.tree_.children_left == -1)]
    # Each first-level leaf's subtree at every size, and how many training images it gets right.
    budget = max_leaves - len(leaves) + 1  # the most one subtree can have when every other has one leaf
    fits, correct = {}, {}
    for leaf in leaves:
        rows = reach == leaf
        fits[leaf], correct[leaf] = [None], [int(np.bincount(p_train[rows]).max())]
        for n in range(2, budget + 1):
            if len(np.unique(p_train[rows])) < 2 or rows.sum() < 2 * min_samples_leaf:
                break
            clf = DecisionTreeClassifier(max_leaf_nodes=n, min_samples_leaf=min_samples_leaf,
                                         random_state=seed).fit(x_train[rows], p_train[rows])
            fits[leaf].append(clf)
            correct[leaf].append(int((clf.predict(x_train[rows]) == p_train[rows]).sum()))
            if clf.get_n_leaves() < n:  # it stopped growing: larger sizes give the same tree
                break
    trees = {}
    for budget in sorted({max_leaves, *(n for n in smaller if len(leaves) <= n < max_leaves)}):
        sizes = _share(leaves, correct, budget)
        trees[budget] = _emit(top, {leaf: fits[leaf][sizes[leaf] - 1] for leaf in leaves}, x_train, p_train)
    return trees


def _share(leaves: list[int], correct: dict[int, list[int]], budget: int) -> dict[int, int]:
    """Sizes (at least 1 each, at most `budget` in all) that maximise the images got right: a knapsack."""
    best = {0: (0, [])}  # leaves used -> (images right, sizes so far)
    for leaf in leaves:
        step: dict[int, tuple[int, list[int]]] = {}
        for used, (right, sizes) in best.items():
            for size, got in enumerate(correct[leaf], start=1):
                total = used + size
                if total <= budget and (total not in step or step[total][0] < right + got):
                    step[total] = (right + got, sizes + [size])
        best = step
    _, sizes = max(best.values(), key=lambda item: item[0])
    return dict(zip(leaves, sizes))


def _emit(top, below: dict, x_train: np.ndarray, p_train: np.ndarray) -> dict:
    tree: dict[str, list] = {k: [] for k in KEYS}
    t = top.tree_

    def node() -> int:
        for k in KEYS:
            tree[k].append(None)
        return len(tree["left"]) - 1

    def split(new: int, feature: int, threshold: float) -> None:
        tree["feature"][new], tree["threshold"][new] = int(feature), float(threshold)

    def leaf(new: int) -> None:
        tree["left"][new] = tree["right"][new] = tree["feature"][new] = -1
        tree["threshold"][new] = 0.0

    def stats(new: int, rows: np.ndarray, cls: int, group: int, level: int) -> None:
        tree["class"][new], tree["group"][new], tree["level"][new] = int(cls), int(group), level

    def majority(rows: np.ndarray) -> int:
        return int(np.bincount(p_train[rows]).argmax()) if rows.any() else 0

    def second(clf, k: int, rows: np.ndarray, group: int) -> int:
        new = node()
        if clf is None:
            stats(new, rows, majority(rows), group, 2)
            leaf(new)
            return new
        s = clf.tree_
        classes = clf.classes_
        stats(new, rows, int(classes[s.value[k, 0].argmax()]), group, 2)
        if s.children_left[k] == -1:
            leaf(new)
        else:
            split(new, s.feature[k], s.threshold[k])
            go_left = rows & (x_train[:, s.feature[k]] <= s.threshold[k])
            tree["left"][new] = second(clf, int(s.children_left[k]), go_left, group)
            tree["right"][new] = second(clf, int(s.children_right[k]), rows & ~go_left, group)
        return new

    def first(k: int, rows: np.ndarray) -> int:
        if t.children_left[k] == -1:
            return second(below[k], 0, rows, _group_of_leaf(top, k))
        new = node()
        group = _group_of_leaf(top, k)
        stats(new, rows, majority(rows), group, 1)
        split(new, t.feature[k], t.threshold[k])
        go_left = rows & (x_train[:, t.feature[k]] <= t.threshold[k])
        tree["left"][new] = first(int(t.children_left[k]), go_left)
        tree["right"][new] = first(int(t.children_right[k]), rows & ~go_left)
        return new

    first(0, np.ones(len(p_train), bool))
    return _drop_idle_splits(tree)


def _group_of_leaf(top, k: int) -> int:
    return int(top.classes_[top.tree_.value[k, 0].argmax()])


def _drop_idle_splits(tree: dict) -> dict:
    """Remove a second-level test whose both sides end in the same class (it changes no answer)."""
    n = len(tree["left"])
    same = [None] * n
    for node in reversed(range(n)):
        lo, hi = tree["left"][node], tree["right"][node]
        if lo == -1:
            same[node] = tree["class"][node]
        elif tree["level"][node] == 2 and same[lo] is not None and same[lo] == same[hi]:
            same[node] = same[lo]
    out: dict[str, list] = {k: [] for k in tree}

    def copy(node: int) -> int:
        new = len(out["left"])
        for k in tree:
            out[k].append(tree[k][node])
        if tree["left"][node] != -1 and same[node] is not None and tree["level"][node] == 2:
            out["class"][new] = same[node]
            out["left"][new] = out["right"][new] = out["feature"][new] = -1
            out["threshold"][new] = 0.0
        elif tree["left"][node] != -1:
            out["left"][new] = copy(tree["left"][node])
            out["right"][new] = copy(tree["right"][node])
        return new

    copy(0)
    return out
