"""The evaluate table: per solver, the paper's metrics over the seeds, and how far each
figure could move with other test problems.

Pass rate (mean fraction of hidden tests passed, x100) and strict accuracy (share of problems
passing all), overall and per group (slice or family); mean and sample std over the seeds
(the decoding spread); pass@k with the unbiased estimator over the seeds' samples per
problem; tokens and wall time per solver. The ± over seeds says nothing about the test set's
size: with 28 problems one problem is 3.6 points. So each strict accuracy also carries a 95 %
percentile-bootstrap interval over problems (each problem's strict accuracy averaged over
the seeds, problems resampled), and :func:`paired` gives the interval of a difference between
two solvers on the same problems (what the claims use).

Not part of the fingerprint of evaluate's kept work (``bdc.evaluate.solvers``): a change here
re-tabulates, it never regenerates.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import numpy as np

from bdc.evaluate.runner import Outcome
from bdc.sandbox.scoring import pass_at_k

DRAWS = 10_000  # bootstrap resamples (a fixed generator: the same rows, the same interval)
LEVEL = 0.95
MIN_PROBLEMS = 10  # below this a percentile bootstrap covers far less than it says: none


def interval(values: list[float] | np.ndarray, seed: int = 0) -> list[float] | None:
    """The 95 % percentile-bootstrap interval of the mean of ``values`` (one per problem);
    None for fewer than ``MIN_PROBLEMS`` values."""
    values = np.asarray(values, dtype=float)
    if len(values) < MIN_PROBLEMS:
        return None
    draws = np.random.default_rng(seed).integers(0, len(values), (DRAWS, len(values)))
    low, high = np.percentile(values[draws].mean(1), [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return [float(low), float(high)]


def per_problem(outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    """Solver -> problem -> strict accuracy (x100) averaged over the seeds."""
    by: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for o in outcomes:
        by[o.solver][o.problem_id].append(o.passed_all)
    return {s: {p: 100 * statistics.mean(v) for p, v in rows.items()} for s, rows in by.items()}


def paired(a: dict[str, float], b: dict[str, float]) -> dict | None:
    """Solver a minus solver b on the problems both ran: the mean difference and its 95 %
    interval over problems (paired: the same problems resampled for both). ``verdict``:
    ``better`` or ``worse`` when the interval excludes zero, else ``undecided`` (also
    without an interval: fewer than ``MIN_PROBLEMS`` problems)."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diffs = [a[p] - b[p] for p in common]
    bounds = interval(diffs)
    verdict = "undecided" if bounds is None or bounds[0] <= 0 <= bounds[1] else \
        "better" if bounds[0] > 0 else "worse"
    return {"difference": statistics.mean(diffs), "interval": bounds,
            "problems": len(common), "verdict": verdict}


def system2_rows(runs: dict[str, list[dict]], problems: int
                 ) -> tuple[dict, dict[str, dict[str, float]]]:
    """The System-2 methods' table rows from their runs (one per seed,
    :func:`bdc.boost.compare.run_method`), and per method each problem's strict accuracy
    (x100, mean over the seeds, problems in id order: the interval's resamples are then the
    same for the same results) for the intervals and the B claim. ``problems``: how many
    test problems, to turn tokens per problem into the table's tokens per seed."""
    rows, by_problem = {}, {}
    for name, seeds in runs.items():
        searched = sorted(set.intersection(*(set(r["solved"]) for r in seeds)))
        solved = {pid: 100 * statistics.mean(r["solved"][pid] for r in seeds)
                  for pid in searched}
        by_problem[name] = solved
        rows[name] = {
            "pass_rate": mean_std([100 * r["hidden_pass_rate"] for r in seeds]),
            "strict_accuracy": mean_std([100 * r["hidden_solve_rate"] for r in seeds]),
            "strict_interval": interval(list(solved.values())),
            "problems": len(solved),
            "tokens": statistics.mean(r["tokens_per_problem"] for r in seeds) * problems,
            "programs_per_problem": statistics.mean(r["programs_per_problem"] for r in seeds),
            "seconds": None, "seeds": len(seeds), "by_group": {}}
    return rows, by_problem


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def table(outcomes: list[Outcome], groups: dict[str, str], seeds: list[int],
          ks: list[int]) -> dict:
    """Per solver: pass rate (x100) and strict accuracy, overall and per group, mean and
    sample std over the seeds; the strict accuracy's interval over problems; pass@k over
    the seeds' samples; tokens and seconds."""
    by_solver: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_solver[o.solver].append(o)
    out = {}
    for solver, rows in by_solver.items():
        per_seed: dict[int, list[Outcome]] = defaultdict(list)
        by_problem: dict[str, list[Outcome]] = defaultdict(list)
        for o in rows:
            per_seed[o.seed].append(o)
            by_problem[o.problem_id].append(o)
        entry = {
            "pass_rate": mean_std([100 * statistics.mean(o.pass_rate for o in r)
                                   for r in per_seed.values()]),
            "strict_accuracy": mean_std([100 * statistics.mean(o.passed_all for o in r)
                                         for r in per_seed.values()]),
            "tokens": sum(o.tokens for o in rows) / len(per_seed),
            "seconds": sum(o.seconds for o in rows) / len(per_seed),
            "seeds": len(per_seed),
            "problems": len(by_problem),
            "strict_interval": interval([100 * statistics.mean(o.passed_all for o in v)
                                         for v in by_problem.values()])}
        n = min(len(v) for v in by_problem.values())
        for k in ks:
            if k <= n:
                entry[f"pass@{k}"] = 100 * statistics.mean(
                    pass_at_k(len(v), sum(o.passed_all for o in v), k)
                    for v in by_problem.values())
        by_group: dict[str, dict[int, list[Outcome]]] = defaultdict(lambda: defaultdict(list))
        for o in rows:
            by_group[groups.get(o.problem_id, "all")][o.seed].append(o)
        entry["by_group"] = {g: {
            "pass_rate": mean_std([100 * statistics.mean(o.pass_rate for o in r)
                                   for r in s.values()]),
            "strict_accuracy": mean_std([100 * statistics.mean(o.passed_all for o in r)
                                         for r in s.values()])}
            for g, s in sorted(by_group.items())}
        out[solver] = entry
    return out


def cell(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def markdown(result: dict, order: list[str], ks: list[int], note: str = "") -> str:
    groups = sorted({g for r in result.values() for g in r.get("by_group", {})})
    head = ["solver", "pass rate", "strict acc.", "95% CI (problems)",
            *[f"pass@{k}" for k in ks], "tokens",
            "seconds", *[f"{g} (strict)" for g in groups]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for solver in [s for s in order if s in result]:
        r = result[solver]
        ci = r.get("strict_interval")
        cells = [solver, cell(r["pass_rate"]), cell(r["strict_accuracy"]),
                 f"{ci[0]:.1f} to {ci[1]:.1f}" if ci else "",
                 *[f"{r[f'pass@{k}']:.1f}" if f"pass@{k}" in r else "" for k in ks],
                 f"{r['tokens']:.0f}",
                 "" if r.get("seconds") is None else f"{r['seconds']:.1f}",
                 *[cell(r["by_group"][g]["strict_accuracy"]) if g in r.get("by_group", {})
                   else "" for g in groups]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def figures(result: dict, order: list[str], groups: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in order if n in result]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1))
    ax.barh(names, [result[n]["strict_accuracy"]["mean"] for n in names],
            xerr=[result[n]["strict_accuracy"]["std"] for n in names], color="C0")
    ax.invert_yaxis()
    ax.set_xlabel("strict accuracy on hidden tests (%), mean ± std over seeds")
    fig.tight_layout()
    rows = [n for n in names if result[n].get("by_group")]
    heat, hx = plt.subplots(figsize=(1.2 * len(groups) + 2, 0.35 * len(rows) + 1))
    image = hx.imshow([[result[n]["by_group"].get(g, {}).get("strict_accuracy", {})
                        .get("mean", 0) for g in groups] for n in rows], cmap="viridis",
                      aspect="auto")
    hx.set_xticks(range(len(groups)), groups, rotation=45)
    hx.set_yticks(range(len(rows)), rows)
    heat.colorbar(image, label="strict accuracy (%)")
    heat.tight_layout()
    return fig, heat


