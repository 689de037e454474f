"""Measures of whether rules explain rather than restate the answer (reported by `tandem rules` and the benchmark).

- class detectors: a concept whose strongest response correlates above 0.8 (Pearson, test split) with one
  class's logit is that class's detector again, not a part;
- specific concepts: a concept whose top regions (the strongest position of each of its top `TOP_REGIONS`
  training images) come at least 90% from images the network calls one class;
- circular explanations: every condition on the path is a concept specific to the class predicted (the answer
  "zebra, because the zebra concept fired");
- contradictory explanations: one concept said to be strong and weak at the same place (must be 0);
- the hierarchy's depth (levels) and size (groups, leaves, nodes).
"""

from __future__ import annotations

import numpy as np

DETECTOR = 0.8        # correlation with one class logit above which a concept is a class detector
SPECIFIC = 0.9        # share of a concept's top regions from one class above which it is specific to it
TOP_REGIONS = 50


def logit_correlations(anywhere: np.ndarray, logits: np.ndarray, labels: list[str]) -> list[dict]:
    """Per concept, the class whose logit its strongest response follows most closely, and how closely."""
    out = []
    for k in range(anywhere.shape[1]):
        best, label = -1.0, None
        for c in range(logits.shape[1]):
            a, b = anywhere[:, k], logits[:, c]
            r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
            if r > best:
                best, label = r, labels[c]
        out.append({"label": label, "r": round(best, 4)})
    return out


def top_regions(codes: np.ndarray, k: int, count: int = TOP_REGIONS) -> list[tuple[int, int, int]]:
    """(image, row, col) of concept k's strongest position in each of its `count` most activating images."""
    maps = codes[:, k]
    n, h, w = maps.shape
    flat = maps.reshape(n, -1)
    best = flat.argmax(axis=1)
    images = np.argsort(-flat[np.arange(n), best], kind="stable")[:count]
    return [(int(i), int(best[i] // w), int(best[i] % w)) for i in images]


def specificity(codes: np.ndarray, predicted: np.ndarray, labels: list[str]) -> list[dict]:
    """Per concept: the class most of its top regions come from, that share, and whether it is specific."""
    out = []
    for k in range(codes.shape[1]):
        images = [i for i, _, _ in top_regions(codes, k)]
        share = np.bincount(predicted[images], minlength=len(labels)) / max(1, len(images))
        c = int(share.argmax())
        out.append({"label": labels[c], "index": c, "share": round(float(share[c]), 4),
                    "specific": bool(share[c] >= SPECIFIC)})
    return out


def circular(found: list[dict], predicted: int, specific: list[dict]) -> bool:
    """Every condition is a concept specific to the predicted class (an explanation with none is not circular)."""
    return bool(found) and all(specific[c["concept"]]["specific"] and specific[c["concept"]]["index"] == predicted
                               for c in found)


def contradictory(found: list[dict]) -> bool:
    """One concept both strong and weak at one place (two conditions on one feature with opposite sides)."""
    sides: dict[tuple[int, str], set] = {}
    for c in found:
        sides.setdefault((c["concept"], c["place"]), set()).add(c["op"])
    return any(len(ops) > 1 for ops in sides.values())


def summary(explanations: list[dict], correlations: list[dict], specific: list[dict], tree: dict,
            groups: list[list[int]]) -> dict:
    """The measures of purpose, for the report and rules.json's metrics."""
    n = max(1, len(explanations))
    detectors = [k for k, c in enumerate(correlations) if c["r"] > DETECTOR]
    levels = sorted(set(tree["level"]))
    return {"class_detectors": len(detectors), "class_detector_share": round(len(detectors) / max(1, len(specific)), 4),
            "specific_concepts": sum(s["specific"] for s in specific),
            "circular": sum(e["circular"] for e in explanations),
            "circular_share": round(sum(e["circular"] for e in explanations) / n, 4),
            "contradictory": sum(e["contradictory"] for e in explanations),
            "levels": len(levels), "groups": len(groups), "nodes": len(tree["left"]),
            "explained": len(explanations)}
