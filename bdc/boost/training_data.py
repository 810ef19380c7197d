"""What the rest of the pipeline trains on, made from the explored trees.

method.md: from each problem whose answer passes every hidden test, the answer's thought chain
and its program become two supervised records, problem -> thoughts (P2T) and problem +
thoughts -> program (T2S); the program was written from exactly that chain, so the two are
consistent. Every node that beat its parent gives a preference pair.

The builders see a problem's :class:`PublicView` and the explore record (the tree, the answer
and its single hidden score), never the hidden tests themselves. Records are structured
(prompt, thoughts, program); turning them into training text is the experts stage's template.
"""

from __future__ import annotations

from bdc.problems.format import PublicView


def solved(record: dict) -> bool:
    """Did the answer pass every hidden test (the one hidden score the record holds)?"""
    return bool(record.get("solved_hidden"))


def sft_records(view: PublicView, record: dict) -> list[dict]:
    """P2T and T2S records of a problem whose answer passes every hidden test (P2T only
    when the answer has a thought chain)."""
    if not solved(record):
        return []
    a = record["answer"]
    base = {"problem_id": view.id, "source": view.source, "kind": view.kind,
            "entry_point": view.entry_point, "prompt": view.prompt,
            "thoughts": list(a["thoughts"]), "program": a["program"], "agent": a["agent"],
            "thought_agents": list(a.get("thought_agents", [])),
            "public_pass_rate": a["public_pass_rate"],
            "hidden_pass_rate": a["hidden"]["pass_rate"]}
    out = []
    if a["thoughts"]:
        out.append({**base, "task": "p2t"})
    out.append({**base, "task": "t2s"})
    return out


def preference_pairs(view: PublicView, record: dict) -> list[dict]:
    """At each state: a child that beat its parent, against its worst simulated sibling."""
    nodes = record["tree"]["nodes"]
    pairs = []
    for parent in nodes:
        kids = [nodes[c] for c in parent["children"] if nodes[c]["programs"]]
        for chosen in kids:
            if chosen["value"] <= parent["value"]:
                continue
            worst = min(kids, key=lambda k: (k["value"], k["id"]))
            if worst["value"] < chosen["value"]:
                pairs.append({"problem_id": view.id, "prompt": view.prompt,
                              "thoughts": parent["thoughts"], "chosen": chosen["thoughts"][-1],
                              "rejected": worst["thoughts"][-1],
                              "chosen_value": chosen["value"],
                              "rejected_value": worst["value"]})
    return pairs
