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
