"""Routing a problem to its cluster from its text alone: the embedder the clusters were made
with (``embedder.json``) and the nearest of the saved centroids (``centroids.npy``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bdc import artifacts
from bdc.disentangle.clustering import assign
from bdc.disentangle.embedding import Embedder, EmbedderSpec
from bdc.problems.format import Problem


def route(problems: list[Problem], clusters_dir: Path) -> np.ndarray:
    """Each problem's nearest centroid (cosine), from its prompt."""
    embedder = json.loads((clusters_dir / artifacts.EMBEDDER).read_text())
    spec = EmbedderSpec(embedder["model"], embedder["trust_remote_code"])
    centroids = np.load(clusters_dir / artifacts.CENTROIDS)
    return assign(Embedder(spec).embed([p.prompt for p in problems]), centroids)
