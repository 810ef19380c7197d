"""The study's tables and verdicts: per world, N and capacity, each arm's strict accuracy
(per problem: the mean over decoding and training seeds) with its interval over problems,
and each pre-registered comparison as a paired difference with its interval and verdict
(``bdc.evaluate.table.paired``: decided only where the interval excludes zero).

Across the N of a world, the scaling statements use Holm's correction (docs/study.md):
:func:`holm` gives each N's adjusted verdict.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from bdc.evaluate.table import interval, paired

# (name, a, b, the predicted sign, hypothesis): a claim holds where a - b lies wholly on the
# predicted side of zero
COMPARISONS = (
    ("D: oracle expert - full", "oracle", "full", "+", "H1 (conflict) / H5 (mini: <= 0)"),
    ("D: oracle expert - size-matched subset", "oracle", "subset", "+", "H2"),
    ("D: expert, equal steps - full", "oracle_long", "full", "+", "step-count control"),
    ("C: customized - full", "customized", "full", "+", "H3"),
    ("C: customized - uniform merge", "customized", "uniform", "+", "H4"),
    ("C: customized - centroid router", "customized", "centroid", "+", "H6"),
    ("shared expert - full", "shared", "full", "+", "H7"),
    ("shared expert - customized", "shared", "customized", "+", "H7"),
)
ARMS = ("base", "full", "oracle", "oracle_long", "subset", "uniform", "centroid", "customized",
        "shared")


def group(results: list[dict]) -> dict[tuple, list[dict]]:
    """Cell results by (world, N, capacity): their training seeds together."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        c = r["cell"]
        out[(c["world"], c["n"], c["capacity"])].append(r)
    return dict(out)


def pooled(cells: list[dict]) -> dict[str, dict[str, float]]:
    """Arm -> problem -> strict accuracy, the mean over the cells' training seeds (problems
    every seed scored)."""
    out = {}
    for arm in {a for c in cells for a in c["arms"]}:
        mine = [c["arms"][arm] for c in cells if arm in c["arms"]]
        if len(mine) != len(cells):
            continue
        common = set.intersection(*(set(m) for m in mine))
        out[arm] = {p: statistics.mean(m[p] for m in mine) for p in sorted(common)}
    return out


def verdict(comparison: dict | None, sign: str) -> str:
    if comparison is None or comparison["verdict"] == "undecided":
        return "undecided"
    holds = comparison["verdict"] == ("better" if sign == "+" else "worse")
    return "holds" if holds else "fails"


def summarise(cells: list[dict]) -> dict:
    """One (world, N, capacity) group: arms with their accuracy, interval and spread over
    training seeds; the comparisons with their verdicts."""
    by = pooled(cells)
    arms = {}
    for arm in [a for a in ARMS if a in by]:
        per_seed = [statistics.mean(c["arms"][arm].values()) for c in cells]
        arms[arm] = {"strict": statistics.mean(by[arm].values()),
                     "interval": interval(list(by[arm].values())),
                     "seed_std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                     "tokens": statistics.mean(c["tokens"][arm] for c in cells),
                     "problems": len(by[arm])}
    comparisons = {}
    for name, a, b, sign, hypothesis in COMPARISONS:
        if a in by and b in by:
            p = paired(by[a], by[b])
            comparisons[name] = {**(p or {}), "hypothesis": hypothesis, "predicted": sign,
                                 "verdict_claim": verdict(p, sign)}
    first = cells[0]
    return {"seeds": [c["cell"]["seed"] for c in cells], "arms": arms,
            "comparisons": comparisons, "temperature": first["temperature"],
            "records": first["records"], "experts": first["experts"],
            "seconds": sum(c["seconds"] for c in cells)}


def holm(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down procedure: which of the hypotheses are rejected at family-wise
    ``alpha``."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def cell_text(arm: dict) -> str:
    ci = arm["interval"]
    return f"{arm['strict']:.1f} ({ci[0]:.1f} to {ci[1]:.1f})" if ci else \
        f"{arm['strict']:.1f}"


def markdown(summaries: dict[tuple, dict]) -> str:
    """A table per (world, N, capacity) and the comparisons under it."""
    out = []
    for (world, n, capacity), s in summaries.items():
        origin = ", ".join(f"cluster {c}: {v['records']} ({v['explored']} explored)"
                           for c, v in s["records"].items())
        out += [f"### {world} world, N = {n}, {capacity}", "",
                f"Training seeds {s['seeds']}; decoding temperature {s['temperature']} "
                f"(chosen on validation); records per cluster: {origin}; "
                f"{s['seconds'] / 60:.1f} min.", "",
                "| arm | strict accuracy (95% CI over problems) | std over training seeds "
                "| tokens per seed |", "|---|---|---|---|"]
        out += [f"| {arm} | {cell_text(a)} | {a['seed_std']:.1f} | {a['tokens']:.0f} |"
                for arm, a in s["arms"].items()]
        out += ["", "| comparison | hypothesis | difference | 95% CI | verdict |",
                "|---|---|---|---|---|"]
        for name, c in s["comparisons"].items():
            ci = c.get("interval")
            out.append(f"| {name} | {c['hypothesis']} | {c.get('difference', 0):+.1f} | "
                       + (f"{ci[0]:+.1f} to {ci[1]:+.1f}" if ci else "") +
                       f" | {c['verdict_claim']} |")
        out.append("")
    return "\n".join(out)
