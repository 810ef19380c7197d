"""Cosine k-means over unit vectors (scikit-learn), k fixed or chosen by silhouette, and the
measurements that say whether the clusters are worth an expert each.

On unit vectors, squared Euclidean distance is ``2 - 2 cos``, so k-means on them is cosine
k-means up to the centroids' norm; centroids are renormalised and points assigned by cosine,
the rule the hypernetwork's input and the routing baselines use at inference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass
class Clustering:
    k: int
    labels: np.ndarray  # cluster of each point
    centroids: np.ndarray  # (k, d), unit rows
    inertia: float  # k-means objective (the elbow curve)
    silhouette: float  # cosine silhouette; nan when undefined (k = 1 or k = n)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid by cosine."""
    return np.argmax(unit(vectors) @ centroids.T, axis=1)


def cosine_kmeans(vectors: np.ndarray, k: int, seed: int) -> Clustering:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = unit(vectors)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    centroids = unit(km.cluster_centers_)
    labels = assign(x, centroids)
    sil = float(silhouette_score(x, labels, metric="cosine")) \
        if 1 < len(set(labels.tolist())) < len(x) else float("nan")
    return Clustering(k, labels, centroids, float(km.inertia_), sil)


def choose_k(vectors: np.ndarray, ks: list[int], seed: int) -> tuple[Clustering, list[dict]]:
    """The k of best silhouette among ``ks``, and the whole curve (silhouette and inertia
    per k: the elbow plot beside it)."""
    ks = [k for k in ks if 1 <= k <= len(vectors)]
    if not ks:
        raise ValueError(f"no k in the range fits {len(vectors)} points")
    runs = [cosine_kmeans(vectors, k, seed) for k in ks]
    table = [{"k": r.k, "silhouette": r.silhouette, "inertia": r.inertia} for r in runs]
    best = max(runs, key=lambda r: (-np.inf if np.isnan(r.silhouette) else r.silhouette,
                                    -r.k))
    return best, table


def agreement(labels: np.ndarray, truth: list[str]) -> dict[str, float]:
    """Adjusted Rand index and normalised mutual information against known labels (the
    mini families: never used for clustering, only to grade it)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"ari": float(adjusted_rand_score(truth, labels)),
            "nmi": float(normalized_mutual_info_score(truth, labels))}


def family_clusters(labels: np.ndarray, families: list[str]) -> dict[str, int]:
    """The cluster most of each family's training points fall in."""
    by: dict[str, Counter] = {}
    for label, family in zip(labels.tolist(), families, strict=True):
        by.setdefault(family, Counter())[label] += 1
    return {f: c.most_common(1)[0][0] for f, c in by.items()}


def routing_accuracy(centroids: np.ndarray, train_labels: np.ndarray,
                     train_families: list[str], held_out: np.ndarray,
                     held_out_families: list[str]) -> float:
    """How often a held-out problem's nearest centroid, from its text alone (all the
    hypernetwork sees at inference), is the cluster its family's training data fell in."""
    home = family_clusters(train_labels, train_families)
    routed = assign(held_out, centroids)
    hits = [home.get(f) == int(r) for f, r in zip(held_out_families, routed.tolist(),
                                                 strict=True)]
    return float(np.mean(hits)) if hits else float("nan")
