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

import numpy as np

from bdc.evaluate.table import DRAWS, interval, paired
from bdc.study.data import world_label

# (name, a, b, the predicted sign, hypothesis): a claim holds where a - b lies wholly on the
# predicted side of zero (in the mini world the first is H5, predicted <= 0: PREDICTED_IN);
# "±": no direction was predicted, the side is reported
COMPARISONS = (
    ("D: oracle expert - full", "oracle", "full", "+", "H1"),
    ("D: oracle expert - size-matched subset", "oracle", "subset", "+", "H2"),
    ("D: expert, equal steps - full", "oracle_long", "full", "+", "step-count control"),
    ("D: warm-started expert - full", "oracle_warm", "full", "+", "H9"),
    ("warm-started expert - oracle expert", "oracle_warm", "oracle", "±", "reported"),
    ("C: customized - full", "customized", "full", "+", "H3"),
    ("C: customized - uniform merge", "customized", "uniform", "+", "H4"),
    ("C: customized - centroid router", "customized", "centroid", "+", "H6"),
    ("shared expert - full", "shared", "full", "+", "H7"),
    ("shared expert - customized", "shared", "customized", "+", "H7"),
)
PREDICTED_IN = {("mini", "D: oracle expert - full"): ("-", "H5")}
# the D and C differences traced across N (one-sided: each has a predicted direction)
SCALED = ("D: oracle expert - full", "D: oracle expert - size-matched subset",
          "D: expert, equal steps - full", "D: warm-started expert - full",
          "C: customized - full", "C: customized - uniform merge")
ARMS = ("base", "full", "oracle", "oracle_long", "oracle_warm", "subset", "uniform",
        "centroid", "customized", "shared")


def group(results: list[dict]) -> dict[tuple, list[dict]]:
    """Cell results by (world as clustered, N, capacity): their training seeds together."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        c = r["cell"]
        out[(world_label(c["world"], c.get("k")), c["n"], c["capacity"])].append(r)
    return dict(out)


def summaries(results: list[dict]) -> dict[tuple, dict]:
    """Every group's summary; a world's predictions hold at any k (mini-k3 is mini's)."""
    return {key: summarise(mine, mine[0]["cell"]["world"])
            for key, mine in group(results).items()}


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


def family(problem_id: str) -> str:
    """A test problem's family from its id (``mini/test/arith/3``,
    ``conflict/test/range-falcon/3``)."""
    return problem_id.split("/")[2]


def verdict(comparison: dict | None, sign: str) -> str:
    if comparison is None or comparison["verdict"] == "undecided":
        return "undecided"
    if sign == "±":
        return comparison["verdict"]  # better or worse
    holds = comparison["verdict"] == ("better" if sign == "+" else "worse")
    return "holds" if holds else "fails"


def summarise(cells: list[dict], world: str = "") -> dict:
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
        sign, hypothesis = PREDICTED_IN.get((world, name), (sign, hypothesis))
        if a in by and b in by:
            p = paired(by[a], by[b])
            comparisons[name] = {**(p or {}), "hypothesis": hypothesis, "predicted": sign,
                                 "verdict_claim": verdict(p, sign)}
    families = sorted({family(p) for v in by.values() for p in v})
    by_family = {arm: {f: statistics.mean(v for p, v in by[arm].items() if family(p) == f)
                       for f in families} for arm in arms}
    first = cells[0]
    return {"seeds": [c["cell"]["seed"] for c in cells], "arms": arms,
            "by_family": by_family,
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


def one_sided_p(a: dict[str, float], b: dict[str, float], seed: int = 0) -> float:
    """The bootstrap's one-sided p-value for ``a - b > 0`` over the problems both ran (the
    share of resampled mean differences at or below zero; the same resampling as the
    intervals): what Holm's correction across N reads."""
    common = sorted(set(a) & set(b))
    diffs = np.asarray([a[p] - b[p] for p in common], dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(diffs), (DRAWS, len(diffs)))
    return float((diffs[draws].mean(1) <= 0).mean())


def crossover(points: list[tuple[int, float]]) -> int | None:
    """H8's N*: the smallest N from which the Holm-corrected test rejects "a - b <= 0" at
    every larger N too (``points``: (N, one-sided p) for each numeric N); None: no such N."""
    points = sorted(points)
    rejected = holm([p for _, p in points])
    for i, (n, _) in enumerate(points):
        if all(rejected[i:]):
            return n
    return None


def scaling(results: list[dict]) -> dict:
    """Per world and capacity, across the numeric N: each D/C difference's one-sided
    p-value per N (seeds pooled) and, with Holm's correction, the crossover N*."""
    out: dict[str, dict] = {}
    groups = group(results)
    for world, capacity in sorted({(w, c) for w, _, c in groups}):
        ns = sorted(n for w, n, c in groups if (w, c) == (world, capacity)
                    and isinstance(n, int))
        if len(ns) < 2:
            continue
        entry = {}
        for name, a, b, _, _ in [c for c in COMPARISONS if c[0] in SCALED]:
            points = []
            for n in ns:
                by = pooled(groups[(world, n, capacity)])
                if a in by and b in by:
                    points.append((n, one_sided_p(by[a], by[b])))
            if len(points) >= 2:
                entry[name] = {"p": dict(points), "crossover": crossover(points)}
        out[f"{world}/{capacity}"] = entry
    return out


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
        families = list(next(iter(s["by_family"].values()), {}))
        out += ["", "Per family (strict accuracy, problems of the family averaged):", "",
                "| arm | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
        out += [f"| {arm} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |"
                for arm, row in s["by_family"].items()]
        out += ["", "| comparison | hypothesis | difference | 95% CI | verdict |",
                "|---|---|---|---|---|"]
        for name, c in s["comparisons"].items():
            ci = c.get("interval")
            out.append(f"| {name} | {c['hypothesis']} | {c.get('difference', 0):+.1f} | "
                       + (f"{ci[0]:+.1f} to {ci[1]:+.1f}" if ci else "") +
                       f" | {c['verdict_claim']} |")
        out.append("")
    return "\n".join(out)


def scaling_text(scale: dict) -> str:
    """Each difference's one-sided p per N and the crossover N* (Holm across N)."""
    out = []
    for key, entry in scale.items():
        ns = sorted({n for e in entry.values() for n in e["p"]})
        if not ns:
            continue
        out += [f"### Scaling: {key} (one-sided bootstrap p per N; Holm across N)", "",
                "| comparison | " + " | ".join(f"N = {n}" for n in ns) + " | N* |",
                "|---|" + "---|" * (len(ns) + 1)]
        out += [f"| {name} | " + " | ".join(
            f"{e['p'][n]:.4f}" if n in e["p"] else "" for n in ns)
            + f" | {e['crossover'] or 'none'} |" for name, e in entry.items()]
        out.append("")
    return "\n".join(out)
