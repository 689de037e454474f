"""What the benchmark scripts share: a target, the machine they ran on, and the report (table or JSON).

    from targets import Target, report
    report("runtime vs torch", ["measure", "runtime", "torch", "ratio"], rows,
           [Target("batch-1 latency runtime/torch", 0.4, 0.5, higher_is_better=False)], as_json=False)
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass

from tandem.hardware.timing import cpu_name


@dataclass
class Target:
    name: str
    value: float
    limit: float
    higher_is_better: bool
    unit: str = ""

    @property
    def passed(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


def machine() -> dict:
    """Where the figures come from; the load average says whether other work shared the cores."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version()}


AT_START = machine()  # before this benchmark loads the cores itself


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def report(title: str, headers: list[str], rows: list[list], targets: list[Target], as_json: bool,
           details: dict | None = None) -> bool:
    """Print the side-by-side table and each target's verdict (or all of it as JSON); True if all pass."""
    info = AT_START
    passed = all(t.passed for t in targets)
    if as_json:
        print(json.dumps({
            "benchmark": title, "machine": info, "passed": passed,
            "table": [dict(zip(headers, [str(row[0]).strip(), *row[1:]])) for row in rows],
            "targets": [{"name": t.name, "value": t.value, "limit": t.limit, "unit": t.unit,
                         "higher_is_better": t.higher_is_better, "passed": t.passed} for t in targets],
            **(details or {}),
        }, indent=2))
        return passed
    print(f"\n{title}\n{info['cpu']}, {info['cores']} cores, load average {info['load_average_1m']} at start "
          f"(figures are noisy when it nears the cores), Python {info['python']}\n")
    print_table(headers, rows)
    print()
    print_table(["target", "value", "limit", "verdict"],
                [[t.name, f"{_cell(t.value)}{t.unit}", f"{'>=' if t.higher_is_better else '<='} {_cell(t.limit)}{t.unit}",
                  "PASS" if t.passed else "FAIL"] for t in targets])
    return passed
