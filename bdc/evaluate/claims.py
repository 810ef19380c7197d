"""The method's claims as measured: B (the tree of agents vs each agent's own tree and vs
best-of-N pooled over the agents at the same budget of executed programs), D (the
oracle expert vs the full-data LoRA, and each expert vs it on its own cluster) and C (the
customized solver vs the full-data LoRA, the uniform merge, Arrow and the oracle), each a
difference of strict accuracy with its baseline named and, where both rows were scored
problem by problem, a paired 95 % interval over problems: a claim holds only where its
interval excludes zero (``verdict``).
"""

from __future__ import annotations

import statistics

from bdc.evaluate.table import paired
from bdc.tracking import metric_name


def claims(result: dict, experts: list[str], own: dict[str, dict],
           problems: dict[str, dict[str, float]] | None = None) -> dict:
    """B, D and C as differences of strict accuracy (mean over seeds), with the baseline;
    ``problems`` (solver -> problem -> strict accuracy, :func:`bdc.evaluate.table.per_problem`)
    adds each difference's interval over problems and its verdict."""
    problems = problems or {}

    def strict(name: str) -> float | None:
        return result[name]["strict_accuracy"]["mean"] if name in result else None

    def gap(a: str, b: str) -> dict | None:
        if strict(a) is None or strict(b) is None:
            return None
        out = {"solver": a, "baseline": b, "difference": strict(a) - strict(b)}
        if a in problems and b in problems and (both := paired(problems[a], problems[b])):
            out |= {k: both[k] for k in ("interval", "problems", "verdict")}
        return out

    tree = next((n for n in result if n.startswith("System-2: tree(") and "+" in n), None)
    baselines = [n for n in result if n.startswith("System-2: ") and n != tree]
    return {
        "B_tree_vs_baselines": [gap(tree, b) for b in baselines] if tree else [],
        "D_oracle_vs_full": gap("oracle expert", "full"),
        "D_experts_vs_full_on_own_cluster": own,
        "C_customized_vs_full": gap("customized", "full"),
        "C_customized_vs_uniform": gap("customized", "merge_uniform"),
        "C_customized_vs_arrow": gap("customized", "arrow"),
        "C_customized_vs_oracle": gap("customized", "oracle expert"),
    }


def own_cluster(problems: dict[str, dict[str, float]], routes: dict[str, int],
                experts: list[str]) -> dict:
    """Each expert against the full-data LoRA on the test problems routed to its cluster."""
    out = {}
    for c, name in enumerate(experts):
        mine = {pid for pid, r in routes.items() if r == c}
        rows = {solver: {p: v for p, v in problems.get(solver, {}).items() if p in mine}
                for solver in (name, "full")}
        if rows[name] and rows["full"]:
            both = paired(rows[name], rows["full"])
            out[name] = {"problems": len(rows[name]),
                         "expert": statistics.mean(rows[name].values()),
                         "full": statistics.mean(rows["full"].values()),
                         "interval": both["interval"], "verdict": both["verdict"]}
    return out


def lines(measured: dict) -> str:
    """One line per claim's comparison, for the table's reader."""
    def line(label: str, g: dict | None) -> str:
        if g is None:
            return f"- {label}: not measured\n"
        text = f"- {label}: {g['solver']} vs {g['baseline']}: {g['difference']:+.1f} points"
        if g.get("interval"):
            low, high = g["interval"]
            text += (f" (95% CI {low:+.1f} to {high:+.1f} over {g['problems']} problems: "
                     f"{g['verdict']})")
        elif "problems" in g:
            text += f" ({g['problems']} problems: too few for an interval)"
        else:
            text += " (totals over problems: no interval)"
        return text + "\n"

    out = [line("B", g) for g in measured["B_tree_vs_baselines"]]
    out.append(line("D", measured["D_oracle_vs_full"]))
    out += [line("C", measured[k]) for k in ("C_customized_vs_full", "C_customized_vs_uniform",
                                             "C_customized_vs_arrow", "C_customized_vs_oracle")]
    return "".join(out)


def metric_key(solver: str) -> str:
    """A solver's name as an MLflow metric key that reads as the name:
    ``System-2: tree(planner+coder)`` -> ``system2.tree.planner-coder``, ``oracle expert``
    -> ``oracle_expert``."""
    name = solver.replace("System-2: ", "system2.").replace("(", ".").replace(")", "")
    return name.replace("+", "-").replace(" ", "_")


def headline_metrics(table: dict) -> dict[str, float]:
    """The table's numbers under one key scheme, for every run that logs them (evaluate's and
    the pipeline's, so the two chart together): per solver its strict accuracy (mean over
    seeds), its std and 95 % interval, its pass rate; per claim its difference and interval
    (``claim.C_customized_vs_full``, ``...ci_low``, ``...ci_high``). Percent, 2 decimals."""
    out: dict[str, float] = {}
    for name, row in table["solvers"].items():
        key = metric_key(name)
        out[f"{key}.strict_accuracy"] = row["strict_accuracy"]["mean"]
        out[f"{key}.strict_accuracy_std"] = row["strict_accuracy"].get("std", 0.0)
        out[f"{key}.pass_rate"] = row["pass_rate"]["mean"]
        if row.get("strict_interval"):
            out[f"{key}.strict_accuracy_ci_low"], out[f"{key}.strict_accuracy_ci_high"] = \
                row["strict_interval"]
    claimed = {k: g for k, g in table.get("claims", {}).items()
               if k.startswith(("C_", "D_oracle")) and g}
    claimed |= {f"B_tree_vs_{metric_key(g['baseline']).removeprefix('system2.')}": g
                for g in table.get("claims", {}).get("B_tree_vs_baselines", []) if g}
    for key, g in claimed.items():
        out[f"claim.{key}"] = g["difference"]
        if g.get("interval"):
            out[f"claim.{key}.ci_low"], out[f"claim.{key}.ci_high"] = g["interval"]
    return {metric_name(k): round(float(v), 2) for k, v in out.items()}


def verdict(table: dict) -> str:
    """Three lines that answer "did Boost, Disentangle and Customize each help?" with the
    strongest baseline and its interval: what a run's description opens with (the whole
    table is an artifact)."""
    solvers, measured = table["solvers"], table.get("claims", {})

    def acc(name: str) -> str:
        row = solvers[name]["strict_accuracy"]
        return f"{row['mean']:.1f} ± {row.get('std', 0.0):.1f}"

    def gap(g: dict | None, baseline: str | None = None) -> str:
        if not g:
            return f"vs {baseline}: not measured"
        text = f"vs {baseline or g['baseline']} {g['difference']:+.1f}"
        if g.get("interval"):
            low, high = g["interval"]
            text += f" (95% CI {low:+.1f} to {high:+.1f}: {g['verdict']})"
        return text

    system1 = [n for n in table.get("order", solvers) if n in solvers
               and not n.startswith("System-2: ")]
    out = []
    if system1:
        best = max(system1, key=lambda n: solvers[n]["strict_accuracy"]["mean"])
        problems = solvers[best].get("problems", "?")
        seeds = solvers[best].get("seeds", "?")
        out.append(f"**Best System-1 solver: {best}**, {acc(best)} % strict accuracy (hidden "
                   f"tests, {problems} problems, mean ± std over {seeds} seeds).")
    if "customized" in solvers:
        out.append(f"**Customize:** customized {acc('customized')} %; " + "; ".join(
            gap(measured.get(k), label) for k, label in (
                ("C_customized_vs_full", "full-data LoRA"),
                ("C_customized_vs_uniform", "uniform merge"),
                ("C_customized_vs_arrow", "Arrow"))) + ".")
    parts = []
    if measured.get("D_oracle_vs_full"):
        parts.append("**Disentangle:** oracle expert " + gap(measured["D_oracle_vs_full"],
                                                             "full-data LoRA"))
    trees = [g for g in measured.get("B_tree_vs_baselines", []) if g]
    if trees:  # the strongest baseline: the one that solves most
        g = max(reversed(trees), key=lambda g: solvers[g["baseline"]]["strict_accuracy"]["mean"])
        parts.append(f"**Boost:** tree of agents {gap(g)}, its strongest baseline")
    if parts:
        out.append("; ".join(parts) + ".")
    return "\n\n".join(out) + ("\n\nDifferences in points of strict accuracy, paired over "
                               "problems; a claim holds only where its interval excludes "
                               "zero.")
