"""The method's claims as measured: B (the tree of agents vs each agent's own tree), D (the
oracle expert vs the full-data LoRA, and each expert vs it on its own cluster) and C (the
customized solver vs the full-data LoRA, the uniform merge, Arrow and the oracle), each a
difference of strict accuracy with its baseline named.
"""

from __future__ import annotations

import statistics


def claims(result: dict, experts: list[str], own: dict[str, dict]) -> dict:
    """B, D and C as differences of strict accuracy (mean over seeds), with the baseline."""
    def strict(name: str) -> float | None:
        return result[name]["strict_accuracy"]["mean"] if name in result else None

    def gap(a: str, b: str) -> dict | None:
        if strict(a) is None or strict(b) is None:
            return None
        return {"solver": a, "baseline": b, "difference": strict(a) - strict(b)}

    tree = next((n for n in result if n.startswith("System-2: tree(") and "+" in n), None)
    singles = [n for n in result if n.startswith("System-2: tree(") and "+" not in n]
    return {
        "B_tree_vs_each_agent": [gap(tree, s) for s in singles] if tree else [],
        "D_oracle_vs_full": gap("oracle expert", "full"),
        "D_experts_vs_full_on_own_cluster": own,
        "C_customized_vs_full": gap("customized", "full"),
        "C_customized_vs_uniform": gap("customized", "merge_uniform"),
        "C_customized_vs_arrow": gap("customized", "arrow"),
        "C_customized_vs_oracle": gap("customized", "oracle expert"),
    }


def own_cluster(outcomes, routes: dict[str, int], experts: list[str]) -> dict:
    """Each expert against the full-data LoRA on the test problems routed to its cluster."""
    out = {}
    for c, name in enumerate(experts):
        mine = {pid for pid, r in routes.items() if r == c}
        rows = {solver: [o.passed_all for o in outcomes if o.solver == solver and
                         o.problem_id in mine] for solver in (name, "full")}
        if rows[name]:
            out[name] = {"problems": len(mine), "expert": 100 * statistics.mean(rows[name]),
                         "full": 100 * statistics.mean(rows["full"])}
    return out


