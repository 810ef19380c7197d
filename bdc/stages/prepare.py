"""Stage ``prepare``: configured problem sources -> ``explore`` and ``test`` problem files.

The explore pool feeds the search (Boost) and so training; the test pool is only ever scored.
They must not share a problem, so overlap is an error rather than a warning.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from bdc.config import Params, SourceSettings
from bdc.jsonl import atomic_open, details_path, write_metrics
from bdc.problems.format import Problem, write_problems
from bdc.problems.sources import SourceError, load_source

# the numbers `dvc metrics show` shows; all of them go to data/metrics/details/
HEADLINE = ("explore.problems", "test.problems")


def load_pool(sources: list[SourceSettings], default_min_tests: int,
              seed: int) -> list[Problem]:
    problems: list[Problem] = []
    for src in sources:
        data = load_source(src.name, path=src.path, slice=src.slice, limit=src.limit,
                           min_tests=src.min_tests or default_min_tests, seed=seed,
                           split=src.split)
        problems += data.problems
    return problems


def pool_metrics(problems: list[Problem]) -> dict:
    tests = [len(p.tests_for("all")) for p in problems]
    return {
        "problems": len(problems),
        "by_source": dict(Counter(p.source for p in problems)),
        "by_difficulty": dict(Counter(str(p.meta.get("difficulty", "n/a")) for p in problems)),
        "by_family": dict(Counter(str(p.meta.get("family", "n/a")) for p in problems)),
        "tests_per_problem": statistics.mean(tests) if tests else 0.0,
        "public_tests_per_problem": statistics.mean(len(p.tests.public) for p in problems)
        if problems else 0.0,
    }


def prepare(params: Params, out_dir: Path, metrics_path: Path,
            plots_path: Path | None = None) -> dict:
    min_tests = params.problems.split.min_tests
    pools = {name: load_pool(getattr(params.problems, name), min_tests, params.seed)
             for name in ("pretrain", "explore", "test")}
    names = list(pools)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            overlap = {p.id for p in pools[a]} & {p.id for p in pools[b]}
            if overlap:
                raise SourceError(f"problems.{a} and problems.{b} share {len(overlap)} "
                                  f"problems, e.g. {sorted(overlap)[0]!r}: make the pools "
                                  "disjoint")
    for name, problems in pools.items():
        write_problems(out_dir / f"{name}.jsonl", problems)
    explore, test = pools["explore"], pools["test"]
    metrics = {name: pool_metrics(problems) for name, problems in pools.items()}
    write_metrics(metrics_path, metrics, HEADLINE)
    if plots_path:
        with atomic_open(plots_path) as f:
            f.write("problem,pool,tests\n")
            for pool, problems in (("explore", explore), ("test", test)):
                for p in problems:
                    f.write(f"{p.id},{pool},{len(p.tests_for('all'))}\n")
    return metrics


def run(params: Params, out_dir: Path, metrics_path: Path, plots_path: Path) -> dict:
    """The stage with its MLflow run: parameters read, metrics, a table and a plot."""
    from bdc.tracking import stage_run

    with stage_run("prepare", {"problems": params.problems.model_dump()},
                   params.profile, doc=__doc__) as tracked:
        metrics = prepare(params, out_dir, metrics_path, plots_path)
        for pool in ("pretrain", "explore", "test"):
            tracked.dataset(out_dir / f"{pool}.jsonl", f"{pool} problems", "output")
        tracked.metrics(metrics)
        tracked.table([{"pool": pool, "source": source, "problems": n}
                       for pool in ("pretrain", "explore", "test")
                       for source, n in metrics[pool]["by_source"].items()],
                      "problems_by_source.json")
        tracked.figure(_tests_histogram(plots_path), "tests_per_problem.png")
        tracked.artifact(details_path(metrics_path))
    return metrics


def _tests_histogram(plots_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [line.split(",") for line in plots_path.read_text().splitlines()[1:]]
    fig, ax = plt.subplots(figsize=(5, 3))
    for pool in ("explore", "test"):
        ax.hist([int(r[2]) for r in rows if r[1] == pool], bins=20, alpha=0.6, label=pool)
    ax.set_xlabel("tests per problem")
    ax.set_ylabel("problems")
    ax.legend()
    fig.tight_layout()
    return fig
