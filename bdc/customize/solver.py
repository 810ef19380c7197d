"""The customized solver as one object: embedder and centroids (for z), the gated model and
its tokenizer, the shared System-1 template. What the customize stage trains, ``bdc solve``
runs, the registry serves and the evaluate stage scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bdc import artifacts
from bdc.customize.config import HypernetConfig
from bdc.customize.model import CustomizedModel, inputs
from bdc.disentangle.experts import load_adapters

SOLVER_NAME = "solver.json"


class Solver:
    def __init__(self, model: CustomizedModel, tokenizer, template, embedder,
                 centroids: np.ndarray, base: str) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.embedder, self.centroids, self.base = embedder, centroids, base

    def save(self, folder: Path) -> None:
        """The hypernetwork, and what it runs on: the base's reference and the template."""
        self.model.save(folder)
        (folder / SOLVER_NAME).write_text(json.dumps({"base": self.base,
                                                      "template": self.template.name}))

    def z(self, prompts: list[str]) -> np.ndarray:
        return inputs(self.embedder.embed(prompts), self.centroids)

    def solve(self, prompts: list[str], max_new_tokens: int, batch_size: int,
              temperature: float | None = None, seed: int = 0) -> list[tuple[list[str], str]]:
        from bdc.llm.system1 import solve

        return solve(self.model, self.tokenizer, self.template, prompts, max_new_tokens,
                     batch_size, temperature=temperature, seed=seed, z=self.z(prompts))


def embedder_of(clusters_dir: Path):
    from bdc.disentangle.embedding import Embedder, EmbedderSpec

    info = json.loads((clusters_dir / artifacts.EMBEDDER).read_text())
    return Embedder(EmbedderSpec(info["model"], info["trust_remote_code"]))


def build(base: str, experts_dir: Path, experts: list[str], clusters_dir: Path,
          layers, projections, hidden: int, normalisation: str, template_kind: str = "auto",
          device: str = "cpu", dtype: str | None = None, seed: int | None = None) -> Solver:
    """An untrained solver over the experts (it equals their uniform merge). ``seed`` seeds
    the router's initialisation (its first layer is random): a training run seeded only
    after the build would start every seed from one router (issue 28)."""
    import torch

    from bdc.llm.system1 import template_for

    centroids = np.load(clusters_dir / artifacts.CENTROIDS)
    embedder = embedder_of(clusters_dir)
    peft, tokenizer = load_adapters(base, experts_dir, experts, device, dtype)
    z_dim = int(json.loads((clusters_dir / artifacts.EMBEDDER).read_text())["dimension"]) + \
        len(centroids)
    if seed is not None:
        torch.manual_seed(seed)
    model = CustomizedModel.from_experts(peft, experts, layers, projections, z_dim, hidden,
                                         normalisation)
    return Solver(model, tokenizer, template_for(tokenizer, template_kind), embedder,
                  centroids, base)


def load(hypernet_dir: Path, experts_dir: Path, clusters_dir: Path, base: str | None = None,
         device: str = "cpu") -> Solver:
    """A trained solver from its folders (the hypernetwork names the modules it adapts and
    the base it runs on; ``base`` overrides that reference, e.g. a local copy)."""
    config = HypernetConfig.load(hypernet_dir)
    saved = json.loads((hypernet_dir / SOLVER_NAME).read_text())
    base, template_kind = base or saved["base"], saved["template"]
    layers = sorted({int(m.split(".layers.")[1].split(".")[0]) for m in config.modules})
    projections = sorted({m.rsplit(".", 1)[-1] for m in config.modules})
    solver = build(base, experts_dir, config.experts, clusters_dir, layers, projections,
                   config.hidden, config.normalisation, template_kind, device)
    solver.model.load(hypernet_dir)
    return solver
