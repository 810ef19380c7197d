"""``bdc study``: every cell of the study in order, each as an MLflow child run under one
parent, then the tables, verdicts and plot (docs/study.md is the pre-registration; the
results go to ``study.out``).

The mini world reads the mini pipeline's outputs (explored records, clusters, test
problems, the base): ``make run`` first. The conflict world makes its own
(:mod:`bdc.study.conflict`). A world's first cell chooses the decoding temperature on its
validation problems; its later cells use it. Finished cells are kept under ``var/study/`` and a run
restores them, so a killed study resumes at the cell it was in.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from bdc import artifacts
from bdc.config import Params
from bdc.jsonl import atomic_open, read_jsonl
from bdc.problems.format import read_problems
from bdc.problems.mini import first_per_family
from bdc.study.cells import Cell, run_cell
from bdc.study.conflict import conflict_world
from bdc.study.data import EXPLORED, World, at_n, clusters_name, mini_world, reclustered
from bdc.study.report import (
    COMPARISONS,
    markdown,
    scaling,
    scaling_text,
    summaries,
)

log = logging.getLogger(__name__)


def cells_of(params: Params) -> list[Cell]:
    """The study's cells in the order they run: world, capacity, N as listed, then training
    seed, for each of the world's cluster counts in the order listed (``study_cells.k``;
    None: the silhouette's). The primary cells (the first capacity at ``primary_n``, or else the
    largest N) take ``primary_seeds``. A world's first cell at each k chooses its decoding
    temperature."""
    s = params.study_cells
    cells = []
    for w in s.worlds:
        grid = s.records_per_cluster.get(w, [])
        if w == "conflict" and EXPLORED in grid:
            raise ValueError("study.records_per_cluster.conflict: nothing is explored in "
                             "the conflict world; give numbers")
        numeric = [n for n in grid if n != EXPLORED]
        primary = s.primary_n or (max(numeric) if numeric else EXPLORED)
        for k in s.k.get(w, [None]):
            for index, name in enumerate(params.study.capacities):
                only = s.capacity_n.get(name, {})
                for n in grid:
                    if w in only and n not in only[w]:
                        continue
                    seeds = s.primary_seeds if index == 0 and n == primary \
                        else s.training_seeds
                    cells += [Cell(w, n, name, seed, k) for seed in seeds]
    return cells


def scaling_figure(summaries: dict[tuple, dict]):
    """Per world and capacity: oracle - full, customized - full and oracle - subset against
    N, with their intervals (only numeric N: ``explored`` is one point of its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {"D: oracle expert - full": "C0", "C: customized - full": "C1",
             "D: oracle expert - size-matched subset": "C2"}
    fig, ax = plt.subplots(figsize=(8, 5))
    keys = sorted({(w, cap) for w, _, cap in summaries})
    styles = ["-", "--", ":", "-."]  # one per world and capacity; colour: the comparison
    for (w, cap), style in zip(keys, styles * len(keys), strict=False):
        points = sorted((n, s) for (w2, n, c2), s in summaries.items()
                        if (w2, c2) == (w, cap) and n != EXPLORED)
        for name, colour in lines.items():
            xs = [n for n, s in points if name in s["comparisons"]]
            cs = [s["comparisons"][name] for n, s in points if name in s["comparisons"]]
            if not xs:
                continue
            ys = [c["difference"] for c in cs]
            low = [c["difference"] - c["interval"][0] for c in cs]
            high = [c["interval"][1] - c["difference"] for c in cs]
            ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, color=colour,
                        linestyle=style, label=f"{name} ({w}, {cap})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("records per cluster N")
    ax.set_ylabel("paired difference in strict accuracy (points)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run_study(params: Params, explore_dir: Path, clusters_dir: Path, problems_dir: Path,
              out_dir: Path, state: Path, say: Callable[[str], None] = log.info) -> dict:
    """The whole study; its summary (also written to ``out_dir``)."""
    import mlflow

    from bdc.sandbox import Sandbox
    from bdc.tracking import stage_run

    s, plan = params.study, params.study_cells
    worlds: dict[tuple[str, int | None], World] = {}

    sandbox = None  # the study's, once open

    def world_of(cell: Cell) -> World:
        if (cell.world, cell.k) not in worlds:
            worlds[cell.world, cell.k] = make_world(cell.world, cell.k)
            w = worlds[cell.world, cell.k]
            say(f"study: the {cell.label} world: {len(w.explored or w.reference)} clusters, "
                f"{len(w.test)} test problems, "
                f"{len(w.validation)} validation problems, "
                f"{sum(map(len, w.explored.values()))} explored and "
                f"{sum(map(len, w.reference.values()))} reference records")
        return worlds[cell.world, cell.k]

    def make_world(name: str, k: int | None) -> World:
        if name == "conflict":
            return conflict_world(params, state / "study" / "conflict", plan.pool_n.conflict,
                                  s.validation_per_family, s.test_per_family, say, sandbox, k)
        sft = list(read_jsonl(explore_dir / artifacts.SFT, dict))
        clusters = clusters_dir  # the pipeline's, or the explored problems clustered anew
        assignments = list(read_jsonl(clusters_dir / artifacts.ASSIGNMENTS, dict))
        if k is not None:
            clusters = state / "study" / "mini" / clusters_name(k)
            assignments = reclustered(sft, read_problems(problems_dir / artifacts.pool(
                "explore")), clusters, params, k)
        return mini_world(
            sft, assignments, first_per_family(read_problems(
                problems_dir / artifacts.pool("test")), s.test_per_family), clusters,
            params.experts.base, params.problems.explore[0].limit or 50,
            s.validation_per_family, plan.pool_n.mini)

    cells = cells_of(params)
    results, temperature = [], {}
    started = time.perf_counter()
    with stage_run("study", {"study": s.model_dump(), "study_cells": plan.model_dump()},
                   params.profile, doc=__doc__) as parent, \
            Sandbox(params.sandbox) as opened:
        sandbox = opened
        for i, cell in enumerate(cells, 1):
            say(f"study: cell {i}/{len(cells)} {cell.key}")
            with mlflow.start_run(run_name=cell.key, nested=True,
                                  tags={"bdc.stage": "study.cell"}):
                mlflow.log_params({"world": cell.world, "n": cell.n, "k": cell.k,
                                   "capacity": cell.capacity, "seed": cell.seed})

                def progress(name: str, reused: bool, index: int, total: int) -> None:
                    say(f"study:   adapter {index + 1}/{total} {name}"
                        + (" (kept)" if reused else ""))

                short = {c: len(v) for c, v in at_n(world_of(cell).explored,
                                                     world_of(cell).reference,
                                                     cell.n).items()
                         if cell.n != EXPLORED and len(v) < int(cell.n)}
                if short:  # the table says how many each cluster had
                    say(f"study: {cell.key}: clusters {short} hold fewer than N = {cell.n} "
                        "records (study_cells.pool_n sizes the reference pool)")
                result = run_cell(world_of(cell), cell, params,
                                  temperature.get(cell.label), sandbox, state / "study",
                                  progress)
                temperature[cell.label] = result["temperature"]
                mlflow.log_metrics({f"{arm}.strict_accuracy": round(
                    sum(v.values()) / len(v), 2) for arm, v in result["arms"].items()}
                    | {"seconds": result["seconds"]})
            say(f"study: cell {i}/{len(cells)} done in {result['seconds']:.0f} s: " + ", ".join(
                f"{arm} {sum(v.values()) / len(v):.1f}" for arm, v in result["arms"].items()))
            results.append(result)
        summary = summaries(results)
        scale = scaling(results)
        text = markdown(summary) + scaling_text(scale)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(out_dir / "table.md") as f:
            f.write(text)
        with atomic_open(out_dir / "table.json") as f:
            json.dump({"summaries": [{"world": w, "n": n, "capacity": c, **v}
                                     for (w, n, c), v in summary.items()],
                       "scaling": scale, "cells": results,
                       "seconds": round(time.perf_counter() - started, 1)}, f, indent=1)
        parent.artifact(out_dir / "table.md")
        parent.artifact(out_dir / "table.json")
        if len({n for _, n, _ in summary}) > 1:
            fig = scaling_figure(summary)
            fig.savefig(out_dir / "scaling.png", dpi=110)
            parent.artifact(out_dir / "scaling.png")
        parent.metrics({f"{w}.n{n}.{cap}.{a}_minus_{b}": round(
            v["comparisons"][name]["difference"], 2)
            for (w, n, cap), v in summary.items()
            for name, a, b, _, _ in COMPARISONS if name in v["comparisons"]})
        parent.metrics({"cells": len(cells),
                        "minutes": round((time.perf_counter() - started) / 60, 1)})
    return {"summaries": summary, "table": text}
