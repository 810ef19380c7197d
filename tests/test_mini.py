"""The mini profile: the generated benchmark and a ci-sized pretraining run."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from bdc.config import Params, PretrainSettings
from bdc.llm import prompts
from bdc.problems import mini
from bdc.problems.format import CallTest
from bdc.sandbox import Sandbox
from bdc.sandbox.scoring import score_samples


@pytest.fixture(scope="module")
def splits():
    return {s: mini.load(slice=s, limit=n, seed=0).problems
            for s, n in (("pretrain", 60), ("explore", 10), ("test", 10))}


def test_families_phrasings_and_problem_shape(splits):
    problems = splits["explore"]
    assert set(Counter(p.meta["family"] for p in problems).values()) == {10}
    assert len(mini.FAMILIES) >= 6
    for p in problems:
        ref = p.meta["reference"]
        assert 1 <= len(ref["thoughts"]) <= 3 and ref["program"].startswith("def f(")
        tests = p.tests_for("all")
        assert len(tests) >= 6 and all(isinstance(t, CallTest) for t in tests)
        assert len(p.tests.public) == len(tests) // 2
    # several phrasings per family, and solutions of clearly different shapes
    for family in mini.FAMILIES:
        starts = {p.prompt.split()[0] for p in splits["pretrain"] if p.meta["family"] == family}
        assert len(starts) >= 2, family
    shapes = {p.meta["family"]: p.meta["reference"]["program"] for p in problems}
    assert "for " in shapes["sequence"] and "if x <" in shapes["branch"]
    assert "counts" in shapes["count"] and "kept" in shapes["filter"]


def test_thousands_of_distinct_problems():
    prompts = {spec.prompt for spec, _ in mini.generate("pretrain", 500, seed=0)}
    assert len(prompts) == 3000


def test_deterministic_from_the_seed():
    a = mini.load(slice="explore", limit=5, seed=7).problems
    b = mini.load(slice="explore", limit=5, seed=7).problems
    c = mini.load(slice="explore", limit=5, seed=8).problems
    assert a == b and [p.prompt for p in a] != [p.prompt for p in c]


def test_splits_are_disjoint_in_parameters_text_and_solutions():
    seen = {}
    for split, n in (("pretrain", 300), ("explore", 50), ("test", 30)):
        rows = mini.generate(split, n, seed=0)
        seen[split] = ({(s.family, s.params) for s, _ in rows}, {s.prompt for s, _ in rows},
                       {s.code for s, _ in rows})
        assert all(mini.split_of(s.family, s.params, 0) == split for s, _ in rows)
    for a, b in (("pretrain", "explore"), ("pretrain", "test"), ("explore", "test")):
        for i in range(3):
            assert not seen[a][i] & seen[b][i], (a, b, i)


def test_every_reference_solution_passes_its_tests_in_the_sandbox(splits):
    from bdc.config import SandboxSettings
    from bdc.problems.format import Sample

    problems = {p.id: p for s in ("explore", "test") for p in splits[s]}
    samples = [Sample(problem_id=p.id, program=p.meta["reference"]["program"])
               for p in problems.values()]
    with Sandbox(SandboxSettings(workers=2)) as sandbox:
        scores = list(score_samples(problems, samples, sandbox, "all"))
    assert [s.status for s in scores] == ["passed"] * len(samples)


def test_public_view_hides_family_and_reference(splits):
    view = splits["explore"][0].public_view()
    assert "family" not in view.meta and "reference" not in view.meta


def ci_params() -> Params:
    return Params(pretrain=PretrainSettings(setting="ci"))


@pytest.fixture(scope="module")
def ci_run(ci_pretrained):
    return ci_pretrained


def test_ci_training_run(ci_run):
    """The ci agents trained until they showed their skill (fixed steps did not carry
    across CPUs: on one, 700 steps left the pair solving nothing), so the stages after
    explore get real data; the base needs none and trains its fixed steps."""
    from bdc.llm.mini_models import CI_CYCLES, CI_SKILL, CI_STEPS

    root, metrics, progress, seconds = ci_run  # speed is a benchmark's business, not a test's
    assert set(metrics["models"]) == {"planner", "coder", "base"}
    for name, m in metrics["models"].items():
        assert m["final_loss"] > 0
        assert set(m["explore"]["by_family"]) == set(mini.FAMILIES)
        assert 0.0 <= m["explore"]["pass@1"] <= 1.0
        if m["role"] == "base":
            assert m["steps"] == CI_STEPS and "competence" not in m
            continue
        competence = m["competence"]
        assert competence["problems"] == 10 and competence["at_least"] == CI_SKILL
        checks = competence["checks"]
        assert [c["steps"] for c in checks] == [sum(s for s, _ in CI_CYCLES[:i + 1])
                                                for i in range(len(checks))]
        assert m["steps"] == checks[-1]["steps"]
        assert checks[-1]["skill"] >= CI_SKILL > max(c["skill"] for c in checks[:-1] or
                                                      [{"skill": 0}]), name
    assert {name for name, *_ in progress} == {"planner", "coder", "base"}
    assert set(metrics["boosting"]) == {"pooled", "composed", "plans_equal_reference",
                                        "composition_gain"}
    assert set(metrics["boosting"]["composed"]) == {"planner->coder"}
    assert "explore_from_reference_plan" in metrics["models"]["coder"]
    # follows from the skills: each agent succeeds on 6 of the 10 arith check problems at
    # least, both on 2 at least, and the composition is measured on those 10 (the coder's
    # batch then holds the planner's plans: only a near-tie flipped by padding could undo it)
    assert metrics["boosting"]["composed"]["planner->coder"] > 0


def test_training_stops_when_the_skill_holds_and_fails_loudly_when_it_never_does(splits):
    """train_until: one cycle when the first suffices, every allowed cycle and then an error
    naming the skill and each check when it never holds."""
    from bdc.llm.mini_models import CI_SHAPE
    from bdc.llm.pretraining import Competence, CompetenceNotReached, encode, mixture, train_until
    from bdc.llm.tiny import new_model, train_tokenizer

    corpus = splits["pretrain"]
    tok = train_tokenizer([training_text_of(p) for p in corpus], 512)
    examples = encode(tok, corpus, 256)
    weights = mixture(examples, ci_params().pretrain.models["planner"])
    measured: list[int] = []

    def measure(model) -> float:
        measured.append(1)
        return 0.5

    def run(at_least: float) -> tuple[list[float], list[dict]]:
        return train_until(new_model(CI_SHAPE, tok, seed=0), examples, weights,
                           Competence(corpus[:4], at_least, ((3, 1e-3), (2, 1e-3), (2, 1e-3))),
                           measure, 4, 1, 0.1, False, 0, tok.pad_token_id, loss_on="thoughts")

    losses, checks = run(0.5)
    assert len(losses) == 3 and checks == [{"steps": 3, "skill": 0.5}]
    with pytest.raises(CompetenceNotReached) as failed:
        run(0.6)
    assert len(measured) == 4  # one check, then three
    assert "after 7 steps in 3 cycles" in str(failed.value)
    assert "plans equal to the reference" in str(failed.value)
    assert "0.50, 0.50, 0.50" in str(failed.value) and "must reach 0.60" in str(failed.value)


def training_text_of(problem) -> str:
    from bdc.llm.pretraining import training_text

    return training_text(problem)[1]


def test_ci_models_load_with_the_loader_and_peft(ci_run):
    from peft import LoraConfig, get_peft_model

    from bdc.llm.loading import load_causal_lm

    root = ci_run[0]
    model, tok = load_causal_lm(root / "models" / "planner")
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    batch = tok([prompts.render("Write f(x).")], return_tensors="pt")
    assert lora(**batch, labels=batch["input_ids"]).loss.item() > 0


def test_ci_training_is_reproducible(ci_run, splits):
    from bdc.llm.pretraining import encode, mixture, train, training_text
    from bdc.llm.tiny import new_model, train_tokenizer

    corpus = splits["pretrain"]
    tok = train_tokenizer([training_text(p)[1] for p in corpus], 512)
    examples = encode(tok, corpus, 256)
    spec = ci_params().pretrain.models["planner"]
    from bdc.llm.mini_models import CI_SHAPE

    runs = []
    for _ in range(2):
        model = new_model(CI_SHAPE, tok, seed=3)
        losses = train(model, examples, mixture(examples, spec), 5, 3e-3, 8, 1, 0.1, False, 3,
                       tok.pad_token_id)
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1].values(), runs[1][1].values(),
                                                 strict=True))


def test_planners_learn_the_thoughts_and_coders_the_code(splits):
    """loss_on decides which tokens carry loss: a planner the thoughts and the code header
    (so it hands over to a coder), a coder the code and the end of text, never the problem."""
    from bdc.llm.pretraining import _batch, encode, training_text
    from bdc.llm.tiny import train_tokenizer

    problem = splits["pretrain"][0]
    tok = train_tokenizer([training_text(p)[1] for p in splits["pretrain"]], 512)
    (example,) = encode(tok, [problem], 256)

    def learned(loss_on: str) -> str:
        labels = _batch([example], tok.pad_token_id, loss_on)["labels"][0]
        return tok.decode([t for t in labels.tolist() if t != -100])

    ref = problem.meta["reference"]
    thoughts = "".join(f"{i}. {t}\n" for i, t in enumerate(ref["thoughts"], 1))
    assert learned("thoughts") == thoughts + prompts.CODE_HEADER
    assert learned("code") == ref["program"] + tok.eos_token
    assert learned("all") == thoughts + prompts.CODE_HEADER + ref["program"] + tok.eos_token
    assert problem.prompt not in learned("all")


def test_mixture_puts_focus_share_on_focus_families(splits):
    from bdc.config import PretrainModel
    from bdc.llm.pretraining import Example, mixture

    examples = [Example(ids=[1], prompt_len=1, family=p.meta["family"])
                for p in splits["pretrain"]]
    w = mixture(examples, PretrainModel(role="agent", focus=["arith", "string"],
                                        focus_share=0.8, steps=1))
    share = sum(wi for wi, e in zip(w, examples, strict=True)
                if e.family in ("arith", "string"))
    assert share == pytest.approx(0.8)
    uniform = mixture(examples, PretrainModel(role="base", steps=1))
    assert uniform.sum() == pytest.approx(1.0)


def test_metrics_are_json(ci_run):
    json.dumps(ci_run[1])


def test_pretraining_resumes_without_redoing_finished_models(ci_run, tmp_path):
    """A second run over the same folder reuses every model (same competence, no training);
    a changed training setting retrains only the model it concerns."""
    import shutil

    from bdc.config import PretrainModel, SandboxSettings
    from bdc.llm.mini_models import pretrain

    original, first, _, _ = ci_run
    root = tmp_path / "copy"  # the session's models stay as they are, for other tests
    shutil.copytree(original, root)
    params = ci_params()
    progress = []
    with Sandbox(SandboxSettings(workers=2)) as sandbox:
        again = pretrain(params, root / "problems", root / "models", sandbox,
                         on_progress=lambda *a: progress.append(a))
    assert progress == [] and all(m["resumed"] for m in again["models"].values())
    for name, m in first["models"].items():
        assert again["models"][name]["explore"] == m["explore"]
        assert again["models"][name]["train_seconds"] == m["train_seconds"]
    models = dict(params.pretrain.models)
    models["base"] = PretrainModel(role="base", steps=1, focus=["arith"])
    changed = params.model_copy(update={"pretrain": params.pretrain.model_copy(
        update={"models": models})})
    with Sandbox(SandboxSettings(workers=2)) as sandbox:
        third = pretrain(changed, root / "problems", root / "models", sandbox,
                         on_progress=lambda *a: progress.append(a))
    assert {name for name, *_ in progress} == {"base"}
    assert [m["resumed"] for m in third["models"].values()] == [True, True, False]
