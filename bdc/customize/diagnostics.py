"""What the trained hypernetwork does with its experts: each expert's mean weight per input
cluster (1/K each would be the uniform merge), and how spread the weights are (normalised
entropy: 1 = averaging, 0 = one expert per rank component)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def diagnostics(solver, z: np.ndarray, clusters: list[int], k: int) -> dict:
    """Each expert's mean weight per cluster of the inputs (1/K each: the uniform merge) and
    the entropy of the weights over experts (1 = averaging, 0 = one expert per component)."""
    import torch

    with torch.no_grad():
        zt = torch.as_tensor(z)
        weights = solver.model.router.expert_weights(zt).cpu().numpy()  # (n, K)
        gates = torch.stack(list(solver.model.router(zt).values()), 0)  # (m, n, K*r)
    r = solver.model.config.r
    p = gates.view(gates.shape[0], gates.shape[1], k, r)
    p = p / p.sum(dim=2, keepdim=True).clamp_min(1e-12)
    entropy = float((-(p * p.clamp_min(1e-12).log()).sum(2)).mean() / np.log(k)) if k > 1 \
        else 0.0
    by = defaultdict(list)
    for c, w in zip(clusters, weights, strict=True):
        by[c].append(w)
    per_cluster = {str(c): [round(float(x), 4) for x in np.mean(ws, 0)]
                   for c, ws in sorted(by.items())}
    own = [per_cluster[str(c)][c] for c in range(k) if str(c) in per_cluster]
    return {"normalised_entropy": entropy, "mean_weight_by_cluster": per_cluster,
            "own_expert_weight": float(np.mean(own)) if own else None}


def weights_figure(table: dict, k: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(table, key=int)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * k, 1 + 0.5 * len(rows)))
    image = ax.imshow([table[c] for c in rows], cmap="viridis")
    ax.set_xticks(range(k), [f"expert {i}" for i in range(k)], rotation=45)
    ax.set_yticks(range(len(rows)), [f"cluster {c}" for c in rows])
    ax.set_title("mean expert weight per input cluster")
    fig.colorbar(image)
    fig.tight_layout()
    return fig
