"""The explored data in clusters: embed it both ways (each problem's text, each record's
input and output), cluster each, measure each, and keep the configured one.

The mini families are known but never used to cluster: only to grade (ARI, NMI) and to check
the routing of held-out problems, from their text alone, to the cluster their family's
training data fell in.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from bdc import artifacts
from bdc.config import DisentangleSettings, Params
from bdc.disentangle.clustering import (
    Clustering,
    agreement,
    choose_k,
    cosine_kmeans,
    routing_accuracy,
)
from bdc.disentangle.embedding import Embedder, EmbedderSpec
from bdc.jsonl import read_jsonl
from bdc.problems.format import read_problems

MODES = ("problem", "record")


def record_text(record: dict) -> str:
    """A record's input and output, as the paper embeds it."""
    parts = [record["prompt"], *record.get("thoughts", [])]
    if record["task"] == "t2s":
        parts.append(record["program"])
    return "\n".join(parts)


def cluster(vectors: np.ndarray, settings: DisentangleSettings,
            seed: int) -> tuple[Clustering, list[dict]]:
    if settings.k is not None:
        c = cosine_kmeans(vectors, settings.k, seed)
        return c, [{"k": c.k, "silhouette": c.silhouette, "inertia": c.inertia}]
    return choose_k(vectors, list(range(settings.k_min, settings.k_max + 1)), seed)


def measure(mode: str, clustering: Clustering, labels: np.ndarray,
            families: list[str | None], test_vectors: np.ndarray,
            test_families: list[str | None]) -> dict:
    """Cluster quality of one mode; against the families when they are known."""
    out = {"k": clustering.k, "silhouette": clustering.silhouette}
    if all(families) and families:
        out.update(agreement(labels, families))
        if all(test_families) and len(test_families):
            out["routing_accuracy"] = routing_accuracy(
                clustering.centroids, labels, families, test_vectors, test_families)
    return out


def disentangle(params: Params, sft_path: Path, problems_dir: Path,
                embedder: Embedder | None = None) -> dict:
    """Embed and cluster both ways; everything the outputs are made of."""
    s = params.disentangle
    records = list(read_jsonl(sft_path, dict))
    if not records:
        raise ValueError(f"{sft_path}: no SFT records to cluster")
    pool = {p.id: p for p in read_problems(problems_dir / artifacts.pool("explore"))}
    test = read_problems(problems_dir / artifacts.pool("test"))
    embedder = embedder or Embedder(EmbedderSpec(s.embedder, s.trust_remote_code,
                                                 s.batch_size))
    problem_ids = list(dict.fromkeys(r["problem_id"] for r in records))
    prompts = {r["problem_id"]: r["prompt"] for r in records}
    problem_vectors = embedder.embed([prompts[p] for p in problem_ids])
    record_vectors = embedder.embed([record_text(r) for r in records])
    test_vectors = embedder.embed([p.prompt for p in test])
    family = {pid: (pool[pid].meta.get("family") if pid in pool else None)
              for pid in problem_ids}
    record_families = [family[r["problem_id"]] for r in records]
    test_families = [p.meta.get("family") for p in test]
    row_of = {pid: i for i, pid in enumerate(problem_ids)}
    results = {}
    for mode in MODES:
        vectors = problem_vectors if mode == "problem" else record_vectors
        clustering, curve = cluster(vectors, s, params.seed)
        if mode == "problem":  # every record of a problem in its problem's cluster
            record_labels = np.array([clustering.labels[row_of[r["problem_id"]]]
                                      for r in records])
        else:
            record_labels = clustering.labels
        results[mode] = {"clustering": clustering, "curve": curve,
                         "record_labels": record_labels,
                         "metrics": measure(mode, clustering, record_labels, record_families,
                                            test_vectors, test_families)}
    chosen = results[s.embed]
    labels = chosen["record_labels"]
    by_problem: dict[str, Counter] = defaultdict(Counter)
    for r, label in zip(records, labels.tolist(), strict=True):
        by_problem[r["problem_id"]][label] += 2 if r["task"] == "t2s" else 1  # ties: T2S
    return {"records": records, "labels": labels, "chosen": chosen, "results": results,
            "problem_labels": {pid: c.most_common(1)[0][0] for pid, c in by_problem.items()},
            "family": family, "embedder": embedder, "dimension": int(problem_vectors.shape[1]),
            "record_vectors": record_vectors, "record_families": record_families}
