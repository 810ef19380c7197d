"""Stage ``disentangle`` (DisenLoRA, part 1): embed the validated SFT data, cluster it, and
write what the experts and the hypernetwork need (assignments, centroids, the embedder).

Both things one could embed are measured on every run: each problem's text (what the
hypernetwork sees at inference) and each record's input and output (the paper's choice); the
outputs follow ``disentangle.embed``. In the mini profile the family of every problem is
known; it is never used to cluster, only to grade the clusters (ARI, NMI) and the routing of
held-out test problems to the cluster their family's training data fell in.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from bdc import artifacts
from bdc.config import DisentangleSettings, Params
from bdc.disentangle.clustering import Clustering
from bdc.disentangle.partition import disentangle
from bdc.jsonl import atomic_open, details_path, write_jsonl, write_metrics

# the numbers `dvc metrics show` shows; all of them go to data/metrics/details/
HEADLINE = ("k", "problem.ari", "problem.routing_accuracy")



def cards(out: dict, examples: int = 3) -> str:
    """One card per cluster: size, family mix (mini), example prompts."""
    records, labels = out["records"], out["labels"]
    lines = [f"# {out['chosen']['clustering'].k} clusters", ""]
    for k in range(out["chosen"]["clustering"].k):
        mine = [r for r, label in zip(records, labels.tolist(), strict=True) if label == k]
        problems = list(dict.fromkeys(r["problem_id"] for r in mine))
        lines += [f"## Cluster {k}: {len(mine)} records, {len(problems)} problems", ""]
        mix = Counter(out["family"][p] for p in problems if out["family"][p])
        if mix:
            lines += ["family mix: " + ", ".join(f"{f} {n}" for f, n in mix.most_common()), ""]
        seen = list(dict.fromkeys(r["prompt"] for r in mine))[:examples]
        lines += [f"- {p}" for p in seen] + [""]
    return "\n".join(lines)


def map_figure(out: dict):
    """The records in 2-D (PCA), coloured by cluster, shaped by family (mini)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    xy = PCA(n_components=2, random_state=0).fit_transform(out["record_vectors"])
    families = out["record_families"]
    markers = dict(zip(sorted({f for f in families if f}), "os^Dv<>phx*", strict=False))
    fig, ax = plt.subplots(figsize=(6, 5))
    for label in sorted(set(out["labels"].tolist())):
        for fam in sorted({f or "" for f in families}):
            idx = [i for i, (lab, f) in enumerate(zip(out["labels"].tolist(), families,
                                                      strict=True))
                   if lab == label and (f or "") == fam]
            if idx:
                ax.scatter(xy[idx, 0], xy[idx, 1], s=14, c=f"C{label}",
                           marker=markers.get(fam, "o"), label=f"{label}/{fam}" if fam
                           else str(label), alpha=0.7)
    ax.set_title("records: colour = cluster, shape = family")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def write_outputs(out: dict, settings: DisentangleSettings, out_dir: Path,
                  plots_dir: Path) -> dict:
    chosen = out["chosen"]
    c: Clustering = chosen["clustering"]
    write_jsonl(out_dir / artifacts.ASSIGNMENTS, [
        {"problem_id": r["problem_id"], "task": r["task"], "cluster": int(label)}
        for r, label in zip(out["records"], out["labels"].tolist(), strict=True)])
    write_jsonl(out_dir / artifacts.CLUSTER_PROBLEMS, [
        {"problem_id": pid, "cluster": int(label), "family": out["family"][pid]}
        for pid, label in out["problem_labels"].items()])
    with atomic_open(out_dir / artifacts.CENTROIDS, "wb") as f:
        np.save(f, c.centroids.astype(np.float32))
    embedder = out["embedder"]
    with atomic_open(out_dir / artifacts.EMBEDDER) as f:
        json.dump({"model": embedder.spec.model, "identity": embedder.identity,
                   "trust_remote_code": embedder.spec.trust_remote_code,
                   "dimension": out["dimension"], "normalised": True, "embed": settings.embed,
                   "k": c.k}, f, indent=2)
    with atomic_open(out_dir / artifacts.K_SELECTION) as f:
        json.dump({mode: r["curve"] for mode, r in out["results"].items()}, f, indent=2)
    with atomic_open(plots_dir / "k_selection.csv") as f:
        f.write("embed,k,silhouette,inertia\n" + "".join(
            f"{mode},{row['k']},{row['silhouette']:.4f},{row['inertia']:.4f}\n"
            for mode, r in out["results"].items() for row in r["curve"]))
    with atomic_open(out_dir / artifacts.CARDS) as f:
        f.write(cards(out))
    sizes = Counter(out["labels"].tolist())
    return {"k": c.k, "embed": settings.embed, "records": len(out["records"]),
            "problems": len(out["problem_labels"]),
            "cluster_records": {str(k): sizes.get(k, 0) for k in range(c.k)},
            "embedded_now": embedder.embedded,
            **{f"{mode}.{key}": value for mode, r in out["results"].items()
               for key, value in r["metrics"].items()}}


def run(params: Params, explore_dir: Path, validate_dir: Path, problems_dir: Path,
        out_dir: Path, metrics_path: Path, plots_dir: Path) -> dict:
    """The stage with its MLflow run; refuses data that validate did not pass."""
    from bdc.tracking import stage_run
    from bdc.validation.report import require_validated

    sft = explore_dir / artifacts.SFT
    require_validated(validate_dir / artifacts.REPORT, sft)
    with stage_run("disentangle", {"disentangle": params.disentangle.model_dump(),
                                   "seed": params.seed}, params.profile, doc=__doc__) as tracked:
        tracked.dataset(explore_dir / artifacts.SFT, "SFT records", "clustering")
        out = disentangle(params, sft, problems_dir)
        metrics = write_outputs(out, params.disentangle, out_dir, plots_dir)
        write_metrics(metrics_path, metrics, HEADLINE)
        tracked.metrics(metrics)
        for mode, r in out["results"].items():
            for row in r["curve"]:
                tracked.metrics({f"k_curve.{mode}.silhouette": row["silhouette"],
                                 f"k_curve.{mode}.inertia": row["inertia"]}, step=row["k"])
        tracked.figure(map_figure(out), "map.png")
        tracked.figure(_k_figure(out), "k_selection.png")
        for name in (artifacts.CARDS, artifacts.EMBEDDER, artifacts.K_SELECTION,
                     artifacts.ASSIGNMENTS):
            tracked.artifact(out_dir / name)
        tracked.artifact(details_path(metrics_path))
    return metrics


def _k_figure(out: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    for mode, r in out["results"].items():
        ks = [row["k"] for row in r["curve"]]
        a.plot(ks, [row["silhouette"] for row in r["curve"]], marker="o", label=mode)
        b.plot(ks, [row["inertia"] for row in r["curve"]], marker="o", label=mode)
    a.set_xlabel("k")
    a.set_ylabel("silhouette (cosine)")
    b.set_xlabel("k")
    b.set_ylabel("inertia (elbow)")
    a.legend()
    fig.tight_layout()
    return fig
