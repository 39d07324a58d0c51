"""A paper's claims, checked against the table's own rows: each ``table.claims`` entry

    - {text: "ELEGANT above PPO + KL in r_hat", left: "<row label>", op: ">", right: "<row label>",
       metric: reward_mean}          # right_metric: another metric of the right row (default: metric)

compares two rows' cells (``op: within`` with ``tolerance: t``: whether the cells agree to
within ``t`` — **holds** when ``|left - right|`` plus the combined interval is below ``t``,
**fails** when ``|left - right|`` minus it is above). The verdict uses the cells' 95% intervals (over seeds, or over
evaluation batches for a single run): **holds** when the difference has the claimed sign by
more than ``sqrt(ci_left^2 + ci_right^2)``, **fails** when it has the opposite sign by more
than that, **not settled** in between, **not run** when a row has no runs. ``right`` may
also be a number (a threshold, no interval). The verdicts go into the report and into
``<table>.claims.json`` (what the README's results section is generated from).
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from .experiments import ci_key

OPS = {">": 1.0, "<": -1.0}


def _cell(row_metrics: dict[str, dict], label, metric: str) -> tuple[float, float] | None:
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        return float(label), 0.0
    if label not in row_metrics:
        raise ValueError(f"claim names row {label!r}, which the table does not have "
                         f"(rows: {', '.join(row_metrics)})")
    m = row_metrics[label]
    if not m or m.get(metric) is None:
        return None
    return float(m[metric]), float(m.get(ci_key(metric)) or 0.0)


def check_claims(table: DictConfig, row_metrics: dict[str, dict]) -> list[dict]:
    """One record per claim: its text, both values and intervals, and the verdict."""
    out = []
    for claim in table.get("claims") or []:
        if claim.op not in OPS and claim.op != "within":
            raise ValueError(f"claim {claim.text!r}: op must be >, < or within (got {claim.op!r})")
        if claim.op == "within" and not claim.get("tolerance"):
            raise ValueError(f"claim {claim.text!r}: op within needs a tolerance > 0")
        left = _cell(row_metrics, claim.left, claim.metric)
        right = _cell(row_metrics, claim.right, claim.get("right_metric") or claim.metric)
        record = {"text": claim.text, "left": left, "right": right}
        if left is None or right is None:
            record["verdict"] = "not run"
        elif claim.op == "within":
            gap, margin = abs(left[0] - right[0]), math.hypot(left[1], right[1])
            record["verdict"] = ("holds" if gap + margin < claim.tolerance else
                                 "fails" if gap - margin > claim.tolerance else "not settled")
        else:
            signed = OPS[claim.op] * (left[0] - right[0])
            margin = math.hypot(left[1], right[1])
            record["verdict"] = "holds" if signed > margin else "fails" if signed < -margin else "not settled"
        out.append(record)
    return out


def render_claims(records: list[dict]) -> list[str]:
    if not records:
        return []

    def show(cell):
        return "—" if cell is None else f"{cell[0]:.3g} ± {cell[1]:.2g}" if cell[1] else f"{cell[0]:.3g}"
    lines = ["## The paper's claims", "", "| claim | left | right | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['text']} | {show(r['left'])} | {show(r['right'])} | **{r['verdict']}** |" for r in records]
    return lines + ["", "Verdicts: holds / fails when the difference exceeds the two cells' combined 95% "
                    "interval, not settled otherwise.", ""]
