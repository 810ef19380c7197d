"""Routing a problem to its cluster from its text alone: the embedder the clusters were made
with (``embedder.json``) and the nearest of the saved centroids (``centroids.npy``); and the
check that experts and clusters a stage combines belong together."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bdc import artifacts
from bdc.disentangle.clustering import assign
from bdc.disentangle.embedding import Embedder, EmbedderSpec
from bdc.errors import BDCError
from bdc.problems.format import Problem
from bdc.reuse import file_digest


def route(problems: list[Problem], clusters_dir: Path) -> np.ndarray:
    """Each problem's nearest centroid (cosine), from its prompt."""
    embedder = json.loads((clusters_dir / artifacts.EMBEDDER).read_text())
    spec = EmbedderSpec(embedder["model"], embedder["trust_remote_code"])
    centroids = np.load(clusters_dir / artifacts.CENTROIDS)
    return assign(Embedder(spec).embed([p.prompt for p in problems]), centroids)


class ClustersChanged(BDCError):
    """The experts were trained for other clusters than the ones given."""


def clusters_of(clusters_dir: Path) -> dict:
    """What identifies a clustering for the experts trained on it (their manifest keeps it):
    its centroids' checksum, k and the embedder."""
    centroids = np.load(clusters_dir / artifacts.CENTROIDS)
    embedder = json.loads((clusters_dir / artifacts.EMBEDDER).read_text())
    return {"centroids": file_digest(clusters_dir / artifacts.CENTROIDS),
            "k": int(len(centroids)), "embedder": embedder.get("identity")}


def require_same_clusters(manifest: dict, experts_dir: Path, clusters_dir: Path) -> None:
    """Refuse to combine experts with clusters they were not trained for (re-made with
    another k, say): the hypernetwork's routing features and the oracle's routes would
    silently pair experts with the wrong centroids."""
    made_for, given = manifest.get("clusters"), clusters_of(clusters_dir)
    if made_for != given:
        why = "its manifest does not say which" if made_for is None else (
            f"k = {made_for['k']} (experts {', '.join(manifest['experts'])}) against "
            f"k = {given['k']} in {clusters_dir}" if made_for["k"] != given["k"] else
            f"{clusters_dir / artifacts.CENTROIDS} changed since")
        raise ClustersChanged(
            f"{experts_dir / artifacts.MANIFEST}: the experts were trained for other clusters "
            f"({why}); train the experts again (`dvc repro experts` or `bdc experts`)")
