"""The conflict world of the study (:mod:`bdc.problems.conflict`): its base, pretrained from
scratch on the neutral versions (both conventions, spelled out; no team named), its
training pool clustered as the disentangle stage clusters (the bundled embedder, k by
silhouette), and its test problems. Everything is made once under the study's state folder
and reused while its inputs are unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from bdc.config import Params, PretrainModel
from bdc.jsonl import atomic_open
from bdc.problems import conflict
from bdc.study.data import World, cluster_problems, clusters_name, reference_records

NEUTRAL_PER_SURFACE = 600


def pretrain_base(params: Params, folder: Path, say: Callable[[str], None]) -> str:
    """The tiny base of this world: a tokenizer and model trained on the neutral versions
    (the pretrain split), with the mini world's shape and recipe."""
    from bdc.llm.mini_models import Corpus, effective, train_or_reuse
    from bdc.llm.pretraining import encode, training_text
    from bdc.llm.tiny import train_tokenizer

    shape, _, _ = effective(params)
    neutral = [p for s in conflict.SURFACES for p in conflict.problems(
        s, "pretrain", NEUTRAL_PER_SURFACE, make=lambda rng, s=s: conflict.neutral(s, rng))]
    cued = [p.prompt for f in conflict.FAMILIES for p in conflict.problems(f, "pretrain", 50)]
    tokenizer = train_tokenizer([training_text(p)[1] for p in neutral] + cued,
                                shape.vocab_size)
    corpus = Corpus(neutral, tokenizer, encode(tokenizer, neutral, shape.max_positions))

    def progress(name: str, step: int, steps: int, loss: float) -> None:
        if step % 500 == 0:
            say(f"study: conflict base {step}/{steps} loss {loss:.3f}")

    spec = PretrainModel(role="base", steps=params.study.conflict_base_steps)
    _, record, reused = train_or_reuse(params, "conflict-base", spec, spec.steps,
                                       params.seed, corpus, folder, progress)
    say(f"study: conflict base {'kept' if reused else 'trained'} "
        f"({record.get('train_seconds', 0)} s)")
    return str(folder)


def competence(base: str, folder: Path, sandbox, per_surface: int = 30) -> dict:
    """The base's greedy strict accuracy on neutral problems (each convention spelled out)
    and on cued ones, of the explore split: competent when told, unsure when cued.
    Measured once per base (kept beside it)."""
    from bdc.llm.loading import load_causal_lm
    from bdc.llm.system1 import solve, template_for
    from bdc.sandbox.scoring import solved

    path = folder / "competence.json"
    if path.exists():
        return json.loads(path.read_text())
    # explore-split problems: settings of the study are never chosen on test problems
    neutral = [p for s in conflict.SURFACES for p in conflict.problems(
        s, "explore", per_surface, make=lambda rng, s=s: conflict.neutral(s, rng))]
    cued = [p for f in conflict.FAMILIES for p in conflict.problems(f, "explore", 10)]
    model, tokenizer = load_causal_lm(base)
    template = template_for(tokenizer, "mini")
    out = {}
    for name, problems in (("neutral", neutral), ("cued", cued)):
        programs = [program for _, program in solve(model, tokenizer, template,
                                                    [p.prompt for p in problems], 128, 96)]
        ok = solved(problems, programs, sandbox)
        out[name] = {"strict": 100 * sum(ok) / len(ok), "problems": len(ok)}
    with atomic_open(path) as f:
        json.dump(out, f)
    return out


def cluster(problems: list, folder: Path, params: Params, k: int | None) -> dict:
    """The training pool clustered (:func:`bdc.study.data.cluster_problems`) and how well
    the clusters recover its families, teams and surfaces (``quality.json``)."""
    from bdc.disentangle.clustering import agreement

    best, curve = cluster_problems(problems, folder, params, k)
    families = [p.meta["family"] for p in problems]
    quality = {"k": best.k, "silhouette": best.silhouette, "curve": curve,
               "families": agreement(best.labels, families),
               "teams": agreement(best.labels, [f.split("-")[1] for f in families]),
               "surfaces": agreement(best.labels, [f.split("-")[0] for f in families])}
    with atomic_open(folder / "quality.json") as f:
        json.dump(quality, f, indent=1)
    return quality


def problem_pool(max_n: int, validation_per_family: int) -> tuple[list, list]:
    """The validation problems and the training pool, sized for ``max_n`` records per
    cluster: 0.75 ``max_n`` problems a family (two records each), the same for every family.
    The explore split holds only 168 position and 402 range problems a family, so the
    pretrain split's (cued; the base's weights saw their parameters in neutral form only,
    its tokenizer the first 50 cued prompts) top a family's pool up, as the mini world's
    pool does; the test split's never enter. A family that cannot fill its share is an
    error: an unbalanced pool is another world at every N."""
    need = math.ceil(max(max_n, 50) * 0.75)
    validation, pool = [], []
    for family in conflict.FAMILIES:
        stream = conflict.problems(family, "explore", validation_per_family + need)
        validation += stream[:validation_per_family]
        mine = stream[validation_per_family:]
        mine += conflict.problems(family, "pretrain", need - len(mine))
        if len(mine) < need:
            raise ValueError(f"study_cells.pool_n.conflict: {family} has {len(mine)} problems "
                             f"outside the test split and validation, {need} needed; lower it")
        pool += mine
    return validation, pool


def conflict_world(params: Params, folder: Path, max_n: int, validation_per_family: int,
                   test_per_family: int | None, say: Callable[[str], None],
                   sandbox, k: int | None = None) -> World:
    """The conflict world; its pool clustered into ``k`` clusters (None: as the disentangle
    stage's settings say, by silhouette while its ``k`` is null)."""
    from bdc.evaluate.solvers import home_clusters

    validation, pool = problem_pool(max_n, validation_per_family)  # a bad size fails first
    base = pretrain_base(params, folder / "base", say)
    skill = competence(base, folder / "base", sandbox)
    say(f"study: conflict base, greedy strict accuracy on explore-split problems: "
        f"{skill['neutral']['strict']:.1f} neutral, {skill['cued']['strict']:.1f} cued")
    clusters = folder / clusters_name(k)
    quality = cluster(pool, clusters, params, k)
    say(f"study: conflict world clustered: k {quality['k']}, ARI with the families "
        f"{quality['families']['ari']:.2f}, with the teams {quality['teams']['ari']:.2f}, "
        f"with the surfaces {quality['surfaces']['ari']:.2f}")
    labels = {r["problem_id"]: r["cluster"] for r in map(json.loads, (
        clusters / "problems.jsonl").read_text().splitlines())}
    reference: dict[int, list[dict]] = {}
    for p in pool:
        reference.setdefault(labels[p.id], []).extend(reference_records(p))
    test = [p for f in conflict.FAMILIES
            for p in conflict.problems(f, "test", test_per_family or 30)]
    return World("conflict", {}, dict(sorted(reference.items())), validation,
                 [r for p in validation for r in reference_records(p)], test,
                 home_clusters(clusters), clusters, base)
