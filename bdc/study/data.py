"""What each arm of the study trains on, and the problems it is judged on.

Records per cluster come from the explore stage (``origin: explored``) and, where a cluster
holds fewer than the cell's N, from the mini generator's reference thoughts and programs of
new problems routed to that cluster (``origin: reference``, labelled in every table). The
reference and validation problems are drawn from the explore split after the explore pool's
problems, then from the pretrain split: their parameters are never a test problem's (the
mini splits are disjoint in parameters).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bdc import artifacts
from bdc.config import Params
from bdc.jsonl import write_jsonl
from bdc.problems import mini
from bdc.problems.format import Problem

EXPLORED, REFERENCE = "explored", "reference"


def family_stream(family: str, split: str, count: int, seed: int = 0,
                  attempts_per_problem: int = 200) -> list[Problem]:
    """The first ``count`` distinct problems of ``family`` in ``split`` in the generator's
    own order (:func:`bdc.problems.mini.generate`'s: the explore pool of ``limit: L`` is
    this stream's first L), fewer where the split holds fewer."""
    rng = random.Random(f"{seed}|{split}|{family}")
    seen: set[str] = set()
    out: list[Problem] = []
    for _ in range(count * attempts_per_problem):
        if len(out) == count:
            break
        spec = mini.FAMILIES[family](rng)
        if mini.split_of(family, spec.params, seed) != split or spec.prompt in seen:
            continue
        seen.add(spec.prompt)
        problem = mini.to_problem(spec, mini.reference_outputs(spec.code, spec.inputs),
                                  split, len(out), 2)
        if problem is not None:
            out.append(problem.model_copy(update={"id": f"mini/{split}/{family}/s{len(out)}"}))
    return out


def new_problems(family: str, skip: int, count: int) -> list[Problem]:
    """``count`` problems of ``family`` that no pipeline stage used: the explore split after
    its first ``skip`` (the explore pool), then the pretrain split."""
    explore = family_stream(family, "explore", skip + count)[skip:]
    if len(explore) >= count:
        return explore
    return explore + family_stream(family, "pretrain", count - len(explore))


def reference_records(problem: Problem) -> list[dict]:
    """A problem's P2T and T2S records from the generator's reference thought chain and
    program (as the explore stage writes a solved problem's)."""
    ref = problem.meta["reference"]
    base = {"problem_id": problem.id, "source": problem.source, "kind": problem.kind,
            "entry_point": problem.entry_point, "prompt": problem.prompt,
            "thoughts": list(ref["thoughts"]), "program": ref["program"],
            "origin": REFERENCE}
    return [{**base, "task": "p2t"}, {**base, "task": "t2s"}]


def by_cluster(records: list[dict], assignments: list[dict]) -> dict[int, list[dict]]:
    """The explored records of each cluster (as the disentangle stage assigned them)."""
    cluster = {(a["problem_id"], a["task"]): a["cluster"] for a in assignments}
    out: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        out[cluster[(r["problem_id"], r["task"])]].append({**r, "origin": EXPLORED})
    return dict(sorted(out.items()))


def by_problem(records: list[dict]) -> list[list[dict]]:
    """Records grouped by problem, problems in id order: a problem's P2T and T2S records
    always go to the same side of a split."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["problem_id"]].append(r)
    return [groups[p] for p in sorted(groups)]


def take(records: list[dict], n: int, seed: str) -> list[dict]:
    """About ``n`` records, whole problems, drawn at random (seeded by ``seed``)."""
    groups = by_problem(records)
    random.Random(seed).shuffle(groups)
    out: list[dict] = []
    for group in groups:
        if len(out) >= n:
            break
        out += group
    return out


def at_n(explored: dict[int, list[dict]], reference: dict[int, list[dict]],
         n: int | str) -> dict[int, list[dict]]:
    """Each cluster's records at N: every explored record (``explored``); else N records,
    explored ones first, topped up with reference ones."""
    if n == EXPLORED:
        return explored
    out = {}
    for c in sorted(set(explored) | set(reference)):
        mine = explored.get(c, [])
        kept = take(mine, int(n), f"explored|{c}") if len(mine) >= int(n) else mine
        if len(kept) < int(n):
            kept = kept + take(reference.get(c, []), int(n) - len(kept), f"reference|{c}")
        out[c] = kept
    return out


def halves(records: dict[int, list[dict]], seed: int
           ) -> tuple[dict[int, list[dict]], list[dict]]:
    """Cross-fitting: per cluster, half its problems train the mixture's expert and the other
    half trains the router. No record is on both sides, and a problem's records stay
    together."""
    experts, router = {}, []
    for c, mine in records.items():
        groups = by_problem(mine)
        random.Random(f"{seed}|halves|{c}").shuffle(groups)
        cut = math.ceil(len(groups) / 2)
        experts[c] = [r for g in groups[:cut] for r in g]
        router += [r for g in groups[cut:] for r in g]
    return experts, router


def subset(records: dict[int, list[dict]], cluster: int, seed: int) -> list[dict]:
    """The size-matched control of ``cluster``'s expert: as many records as that cluster
    holds, drawn at random from every cluster's (so it differs in specialisation only)."""
    pooled = [r for c in sorted(records) for r in records[c]]
    rng = random.Random(f"{seed}|subset|{cluster}")
    return rng.sample(pooled, len(records[cluster]))


def records_digest(records) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def world_label(world: str, k: int | None) -> str:
    """A world as clustered: ``mini``, or ``mini-k3`` where the study fixed its k."""
    return world if k is None else f"{world}-k{k}"


def clusters_name(k: int | None) -> str:
    """A world's clusters folder: ``clusters`` (k by silhouette) or ``clusters-k3``."""
    return "clusters" if k is None else f"clusters-k{k}"


def cluster_problems(problems: list[Problem], folder: Path, params: Params, k: int | None):
    """``problems`` embedded (their text, as the disentangle stage's ``embed: problem``) and
    clustered as that stage clusters, into ``k`` clusters (None: its own ``k``, or the best
    silhouette in its ``[k_min, k_max]``); writes what the routing and the hypernetwork
    read (centroids, the embedder, each problem's cluster and family). The clustering and
    its silhouette curve."""
    import numpy as np

    from bdc.disentangle.embedding import Embedder, EmbedderSpec
    from bdc.disentangle.partition import cluster

    d = params.disentangle.model_copy(update={"k": k} if k else {})
    spec = EmbedderSpec(d.embedder, d.trust_remote_code)
    vectors = Embedder(spec).embed([p.prompt for p in problems])
    best, curve = cluster(vectors, d, params.seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / artifacts.CENTROIDS, best.centroids)
    (folder / artifacts.EMBEDDER).write_text(json.dumps({
        "model": d.embedder, "identity": spec.identity(), "trust_remote_code":
        d.trust_remote_code, "dimension": int(vectors.shape[1]), "normalised": True,
        "embed": "problem", "k": best.k}, indent=2))
    write_jsonl(folder / artifacts.CLUSTER_PROBLEMS, [
        {"problem_id": p.id, "cluster": int(c), "family": p.meta.get("family")}
        for p, c in zip(problems, best.labels.tolist(), strict=True)])
    return best, curve


def reclustered(sft: list[dict], explore_pool: list[Problem], folder: Path, params: Params,
                k: int) -> list[dict]:
    """The explored records' assignments with their problems clustered into ``k`` clusters
    (the control of the paper's k beside the silhouette's): every record of a problem in
    its problem's cluster, as the pipeline's ``embed: problem``; ``folder`` gets the
    clusters."""
    ids = set(r["problem_id"] for r in sft)
    problems = [p for p in explore_pool if p.id in ids]
    missing = ids - {p.id for p in problems}
    if missing:
        raise ValueError(f"explore pool: no problem {sorted(missing)[0]} of the SFT records")
    best, _ = cluster_problems(problems, folder, params, k)
    label = {p.id: int(c) for p, c in zip(problems, best.labels.tolist(), strict=True)}
    return [{"problem_id": r["problem_id"], "task": r["task"], "cluster": label[r["problem_id"]]}
            for r in sft]


@dataclass
class World:
    """Everything a cell reads: explored and reference records per cluster, the validation
    problems and their records, the test problems and each family's home cluster."""

    name: str
    explored: dict[int, list[dict]]
    reference: dict[int, list[dict]]
    validation: list[Problem]
    validation_records: list[dict]
    test: list[Problem]
    home: dict[str, int]
    clusters_dir: Path
    base: str


def mini_world(sft: list[dict], assignments: list[dict], test: list[Problem],
               clusters_dir: Path, base: str, pool_limit: int, validation_per_family: int,
               max_n: int) -> World:
    """The mini world of the pipeline's outputs: its explored records as clustered, its 180
    test problems, validation problems after the explore pool, and reference records of new
    problems, enough for ``max_n`` records per cluster (routed to clusters as the
    hypernetwork routes: nearest centroid of the problem's embedding)."""
    from bdc.disentangle.routing import route
    from bdc.evaluate.solvers import home_clusters

    families = list(mini.FAMILIES)
    validation = [p for f in families
                  for p in new_problems(f, pool_limit, validation_per_family)]
    reference: dict[int, list[dict]] = defaultdict(list)
    if max_n:  # two records a problem; routing puts about a family in a cluster
        extra = [p for f in families for p in new_problems(
            f, pool_limit + validation_per_family, math.ceil(max_n * 0.75))[:]]
        for problem, c in zip(extra, route(extra, clusters_dir).tolist(), strict=True):
            reference[int(c)] += reference_records(problem)
    return World("mini", by_cluster(sft, assignments), dict(reference), validation,
                 [r for p in validation for r in reference_records(p)], test,
                 home_clusters(clusters_dir), clusters_dir, base)
