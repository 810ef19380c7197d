"""Stage experts: the shared prompt template, LoRA training with Trainer on one loaded base
(reuse, resume), merges equal to the hand-computed combinations, loading with plain PEFT and
from the MLflow registry, the paper settings dry-run on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from bdc.config import ExpertsSettings, LoraSettings, MergeSettings
from bdc.disentangle.experts import ExpertSet, tokenize, train_all
from bdc.llm.system1 import MiniTemplate, examples, template_for
from bdc.problems import mini

PROBLEMS = mini.load(slice="explore", limit=1).problems[:3]


def records(problems=PROBLEMS) -> list[dict]:
    out = []
    for p in problems:
        ref = p.meta["reference"]
        base = {"problem_id": p.id, "prompt": p.prompt, "thoughts": ref["thoughts"],
                "program": ref["program"]}
        out += [{**base, "task": "p2t"}, {**base, "task": "t2s"}]
    return out


def settings(**kw) -> ExpertsSettings:
    base = dict(base="", template="mini", lora=LoraSettings(r=4, alpha=8, dropout=0.0,
                target_modules=["q_proj", "v_proj"]), lr=5e-3, epochs=2, micro_batch=4,
                accumulation=1, max_length=160, save_steps=2, check_per_cluster=2,
                max_new_tokens=24, generate_batch=8)
    return ExpertsSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def base(ci_pretrained) -> str:
    return str(ci_pretrained[0] / "models" / "base")


def test_training_and_inference_share_one_template(base):
    """P2T output ends with the code header (no end of text) and the T2S input starts where
    it ends: the two records are the one-pass text the solver is prompted for."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    template = template_for(tok, "auto")
    assert isinstance(template, MiniTemplate)  # the tiny tokenizer has no chat template
    p2t, t2s = (examples(r, template) for r in records()[:2])
    assert p2t.input == template.prompt(PROBLEMS[0].prompt)
    assert p2t.output.endswith("### Code\n") and tok.eos_token not in p2t.output
    assert t2s.input == p2t.input + p2t.output and t2s.output.endswith(tok.eos_token)
    thoughts, program = template.parse(p2t.output + PROBLEMS[0].meta["reference"]["program"])
    assert thoughts == PROBLEMS[0].meta["reference"]["thoughts"]
    assert program == PROBLEMS[0].meta["reference"]["program"]
    rows = tokenize(records()[:2], tok, template, 512)
    out_ids = tok(p2t.output, add_special_tokens=False)["input_ids"]
    assert [t for t in rows[0]["labels"] if t != -100] == out_ids  # loss on the output only


def test_chat_template_for_chat_models():
    from bdc.llm.system1 import ChatTemplate

    class Tok:
        eos_token = "<|eot|>"
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    template = template_for(Tok(), "auto")
    assert isinstance(template, ChatTemplate)
    r = records()[:2]
    p2t, t2s = examples(r[0], template), examples(r[1], template)
    assert t2s.input == p2t.input + p2t.output and t2s.output.endswith("```<|eot|>")
    assert template.parse(p2t.output + "def f(x):\n    return 1\n```") == \
        (r[0]["thoughts"], "def f(x):\n    return 1\n")


def test_adapters_train_on_one_base_and_are_reused(tmp_path, base):
    s = settings(base=base)
    experts = ExpertSet(base, s, "mini")
    data = {"full": records(), "cluster_0": records()[:2]}
    first = train_all(experts, data, tmp_path / "out", tmp_path / "work")
    assert set(first) == {"full", "cluster_0"} and not any(r["reused"] for r in first.values())
    assert first["full"]["steps"] == 4 and first["full"]["losses"]  # 6 records, batch 4, 2 ep
    assert first["full"]["trainable_parameters"] == first["cluster_0"]["trainable_parameters"]
    assert experts.adapters == ["full", "cluster_0"]
    # only the LoRA weights changed: the base is frozen and shared
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                      str(tmp_path / "out/full"))
    batch = experts.tokenizer(["### Problem\nx\n### Thoughts\n"], return_tensors="pt")
    experts.peft.set_adapter("full")
    experts.peft.eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, experts.peft(**batch).logits, atol=1e-5)
    again = train_all(ExpertSet(base, s, "mini"), data, tmp_path / "out", tmp_path / "work")
    assert all(r["reused"] for r in again.values())
    changed = train_all(ExpertSet(base, settings(base=base, lr=1e-3), "mini"), data,
                        tmp_path / "out", tmp_path / "work")
    assert not any(r["reused"] for r in changed.values())  # a setting changed: retrained


def test_adapters_are_retrained_when_their_code_changes_or_their_files_are_damaged(
        tmp_path, base, monkeypatch, caplog):
    """Bugs: after a change to the training code every adapter was 'already trained,
    reused' (the reuse key had no code in it); a truncated adapter was reused too, and every
    later run crashed loading it with no path named."""
    import bdc.disentangle.experts as experts_module

    s = settings(base=base)
    data = {"full": records(), "cluster_0": records()[:2]}
    out = tmp_path / "out"
    train_all(ExpertSet(base, s, "mini"), data, out, tmp_path / "work")
    code = experts_module.code_version(experts_module.EXPERT_CODE)
    monkeypatch.setattr(experts_module, "code_version", lambda parts: code + "-edited")
    edited = train_all(ExpertSet(base, s, "mini"), data, out, tmp_path / "work")
    assert not any(r["reused"] for r in edited.values())
    monkeypatch.undo()
    config = json.loads((out / "full" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])
    weights = out / "cluster_0" / "adapter_model.safetensors"
    for damage in (lambda: weights.write_bytes(weights.read_bytes()[:-100]), weights.unlink):
        train_all(ExpertSet(base, s, "mini"), data, out, tmp_path / "work")
        damage()
        with caplog.at_level("WARNING"):
            healed = train_all(ExpertSet(base, s, "mini"), data, out, tmp_path / "work")
        assert healed["full"]["reused"] and not healed["cluster_0"]["reused"]
        assert str(weights) in caplog.text and "training again" in caplog.text
        caplog.clear()
        assert ExpertSet(base, s, "mini").load("cluster_0", out / "cluster_0") is None


def test_an_adapter_is_saved_the_same_whatever_the_process(tmp_path):
    """Bug: PEFT wrote target_modules in a set's order, which changes with each process's
    string hashing, so re-saving an unchanged adapter changed its files and DVC re-ran
    customize and evaluate."""
    from bdc.disentangle.experts import canonical_adapter_config

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "target_modules": ["v_proj", "q_proj", "o_proj", "k_proj"]}))
    canonical_adapter_config(tmp_path)
    first = (tmp_path / "adapter_config.json").read_text()
    assert json.loads(first)["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    canonical_adapter_config(tmp_path)
    assert (tmp_path / "adapter_config.json").read_text() == first


def test_an_interrupted_adapter_resumes_from_its_checkpoint(tmp_path, base, monkeypatch):
    from bdc.disentangle import experts as module

    s = settings(base=base, epochs=4, save_steps=2)
    calls = {"n": 0}
    real = module.Collator.__call__

    def dying(self, rows):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 3 or 4: after the checkpoint at step 2
            raise KeyboardInterrupt
        return real(self, rows)

    monkeypatch.setattr(module.Collator, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        train_all(ExpertSet(base, s, "mini"), {"full": records()}, tmp_path / "out",
                  tmp_path / "work")
    assert list((tmp_path / "work").glob("full-*/checkpoint-2"))
    assert not (tmp_path / "out/full").exists()  # nothing that looks finished
    batches = []

    def counting(self, rows):
        batches.append(len(rows))
        return real(self, rows)

    monkeypatch.setattr(module.Collator, "__call__", counting)
    done = train_all(ExpertSet(base, s, "mini"), {"full": records()}, tmp_path / "out",
                     tmp_path / "work")
    assert done["full"]["resumed_from_checkpoint"] and done["full"]["steps"] == 8
    assert len(batches) == 6  # steps 1-2 were not trained again
    assert [step for step, _ in done["full"]["losses"]] == list(range(1, 9))  # whole curve
    assert not list((tmp_path / "work").glob("full-*"))  # checkpoints cleaned up


def delta(peft_model, adapter: str, module: str = "q_proj", layer: int = 0) -> torch.Tensor:
    target = dict(peft_model.named_modules())[
        f"base_model.model.model.layers.{layer}.self_attn.{module}"]
    return (target.lora_B[adapter].weight @ target.lora_A[adapter].weight) * \
        target.scaling[adapter]


def parts(peft_model, adapter: str, module: str = "q_proj", layer: int = 0):
    target = dict(peft_model.named_modules())[
        f"base_model.model.model.layers.{layer}.self_attn.{module}"]
    return target.lora_A[adapter].weight, target.lora_B[adapter].weight, target.scaling[adapter]


def test_merges_equal_the_hand_computed_combinations(tmp_path, base):
    import math

    from peft.utils.merge_utils import ties

    from bdc.disentangle.merging import merge

    s = settings(base=base, epochs=1)
    experts = ExpertSet(base, s, "mini")
    train_all(experts, {"cluster_0": records()[:2], "cluster_1": records()[2:4],
                        "cluster_2": records()[4:]}, tmp_path / "out", tmp_path / "work")
    names = ["cluster_0", "cluster_1", "cluster_2"]
    merge(experts.peft, names, "merge_uniform", MergeSettings(combination="cat"), 0)
    average = sum(delta(experts.peft, n) for n in names) / 3
    assert torch.allclose(delta(experts.peft, "merge_uniform"), average, atol=1e-6)
    merge(experts.peft, names, "merge_linear", MergeSettings(combination="linear"), 0)
    a, b = zip(*[parts(experts.peft, n)[:2] for n in names], strict=True)
    w = math.sqrt(1 / 3 * parts(experts.peft, names[0])[2])
    by_hand = (sum(b) * w) @ (sum(a) * w)
    assert torch.allclose(delta(experts.peft, "merge_linear"), by_hand, atol=1e-6)
    merge(experts.peft, names, "merge_ties", MergeSettings(combination="ties", weight=1.0,
                                                           density=0.3), 0)
    weights = torch.tensor([math.sqrt(parts(experts.peft, n)[2]) for n in names])
    by_hand = ties(list(b), weights, 0.3) @ ties(list(a), weights, 0.3)
    assert torch.allclose(delta(experts.peft, "merge_ties"), by_hand, atol=1e-6)
    # PEFT's quirk: re-using a name returns silently without merging; ours re-merges
    before = delta(experts.peft, "merge_uniform").clone()
    merge(experts.peft, names[:2], "merge_uniform", MergeSettings(combination="cat"), 0)
    assert not torch.allclose(delta(experts.peft, "merge_uniform"), before)
    # DARE drops at random: the same seed gives the same merge (it differed run to run, and
    # DVC re-ran customize and evaluate after an experts run that reused every adapter)
    dare = MergeSettings(combination="dare_linear", density=0.5)
    merges = []
    for seed in (0, 0, 1):
        torch.manual_seed(len(merges))  # the global generator must not matter
        merge(experts.peft, names, "merge_dare", dare, seed)
        merges.append(delta(experts.peft, "merge_dare").clone())
    assert torch.equal(merges[0], merges[1]) and not torch.equal(merges[0], merges[2])


def test_paper_settings_validate_and_dry_run_on_a_tiny_model(tmp_path, base):
    """paper/params.yaml's experts settings, with the tiny base standing in for the 8B."""
    from bdc.config import load_params
    from tests.conftest import ROOT

    paper = load_params(ROOT / "paper/params.yaml").experts
    assert (paper.lora.r, paper.lora.alpha, paper.lora.dropout) == (8, 16, 0.05)
    assert paper.lora.target_modules == ["q_proj", "v_proj"] and paper.lr == 1e-3
    assert paper.micro_batch * paper.accumulation == 64 and paper.epochs == 1
    dry = paper.model_copy(update={"base": base, "template": "mini", "micro_batch": 2,
                                   "accumulation": 2, "max_length": 128})
    done = train_all(ExpertSet(base, dry, "mini"), {"full": records()}, tmp_path / "out",
                     tmp_path / "work")
    assert done["full"]["steps"] == 2 and json.loads(
        (tmp_path / "out/full/adapter_config.json").read_text())["r"] == 8


def test_the_expert_set_loads_from_the_registry(tmp_path, base, monkeypatch, capfd):
    """Also: the version is logged from code, not as a pickled object (MLflow warned on every
    run: a pickle runs whatever its bytes say when a version is loaded)."""
    import mlflow
    import pandas as pd

    from bdc import tracking
    from bdc.disentangle.registry import MODEL_NAME, register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.setup(tmp_path)
    s = settings(base=base, epochs=1)
    out = tmp_path / "experts"
    train_all(ExpertSet(base, s, "mini"), {"full": records(), "cluster_0": records()[:2]},
              out, tmp_path / "work")
    capfd.readouterr()
    with mlflow.start_run():
        version = register(out, {"base": base, "template": "mini",
                                 "adapters": ["full", "cluster_0"], "experts": ["cluster_0"]},
                           {})
    said = capfd.readouterr()
    assert "CloudPickle" not in said.err + said.out  # MLflow's own log handler: stderr
    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{version}")
    programs = loaded.predict(pd.DataFrame({"prompt": [PROBLEMS[0].prompt] * 2,
                                            "adapter": ["full", "__base__"]}))
    assert len(programs) == 2 and all(isinstance(p, str) for p in programs)
    meta = mlflow.MlflowClient().get_model_version(MODEL_NAME, version)
    assert str(meta.version) == version
    # a registry entry that says what it is: description, tags, a declared signature
    assert "DisenLoRA" in meta.description and meta.tags["base"] == base
    assert "DisenLoRA" in mlflow.MlflowClient().get_registered_model(MODEL_NAME).description
    signature = loaded.metadata.signature
    assert signature.inputs.input_names() == ["prompt", "adapter"]
    assert signature.params.params[0].name == "max_new_tokens"


def test_a_missing_adapter_is_one_error_naming_its_folder(tmp_path, base):
    """Issue 26.8: a missing adapter folder gave two chained tracebacks, a misleading
    HFValidationError (PEFT took the path for a hub id) and then the real one."""
    from bdc.disentangle.experts import MissingAdapter, load_adapters
    from bdc.disentangle.merging import arrow_model
    from bdc.errors import BDCError

    (tmp_path / "cluster_1").mkdir()  # a folder, but no adapter in it
    for load in (lambda: load_adapters(base, tmp_path, ["cluster_0"]),
                 lambda: arrow_model(base, [tmp_path / "cluster_1"], 1, 0)):
        with pytest.raises(MissingAdapter) as caught:
            load()
        assert isinstance(caught.value, BDCError)  # the command line: one line, exit 2
        assert str(tmp_path) in str(caught.value) and "dvc repro experts" in str(caught.value)
        assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_a_p2t_record_folded_into_its_t2s_record_keeps_both_records_losses(base):
    """experts.shared_prefix: each P2T record folded into its problem's T2S record, whose
    input is the P2T record's input and output. One pass over the folded rows must give the
    summed loss and the gradients of the records trained apart (catches P2T labels folded in
    at the wrong positions), and a P2T row whose tokens do not begin its T2S row must stay a
    row of its own (catches a fold that does not check)."""
    from bdc.disentangle.experts import Collator, loss_tokens_loss, shared_prefix_rows

    s = settings(base=base)
    experts = ExpertSet(base, s, "mini")
    experts.add("a", 0)
    recs = records()[:4]  # two problems, a P2T and a T2S record each
    rows = tokenize(recs, experts.tokenizer, experts.template, s.max_length)
    shared = shared_prefix_rows(recs, rows)
    assert len(shared) == 2
    collate = Collator(experts.tokenizer.pad_token_id)
    loss_tokens = sum(sum(t != -100 for t in r["labels"]) for r in rows)
    results = []
    for batch in (rows, shared):
        experts.peft.zero_grad()
        loss = loss_tokens_loss(experts.peft, collate(batch), loss_tokens)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in experts.peft.parameters()
                                        if p.requires_grad]))
    (apart, apart_grads), (folded, folded_grads) = results
    assert torch.allclose(apart, folded, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7)
               for a, b in zip(apart_grads, folded_grads, strict=True))
    off = [dict(r) for r in rows]
    off[0]["input_ids"] = [off[0]["input_ids"][0] + 1, *off[0]["input_ids"][1:]]
    assert len(shared_prefix_rows(recs, off)) == 3


def test_the_experts_stage_trains_folded_rows_with_a_micro_batch_of_as_many_records(
        base, tmp_path):
    """With experts.shared_prefix the stage's adapters train on the folded rows (a problem's
    P2T and T2S records in one row) with the micro-batch scaled to hold as many records, and
    say so in their record; off, a row per record as before. Switching it trains again
    (other rows). Fails if the stage ignores the setting."""
    data = {"full": records()}  # 3 problems: 6 records, 3 folded rows
    on = train_all(ExpertSet(base, settings(base=base), "mini"), data, tmp_path / "on",
                   tmp_path / "work")["full"]
    assert (on["records"], on["rows"], on["micro_batch"]) == (6, 3, 2)
    assert on["steps"] == 4  # 2 epochs of ceil(3 / 2): as many as 2 of ceil(6 / 4)
    off = train_all(ExpertSet(base, settings(base=base, shared_prefix=False), "mini"), data,
                    tmp_path / "on", tmp_path / "work")["full"]
    assert not off["reused"] and off["fingerprint"] != on["fingerprint"]
    assert (off["records"], off["rows"], off["micro_batch"], off["steps"]) == (6, 6, 4, 4)


def test_the_loss_on_loss_tokens_only_is_the_model_s_own_loss(base):
    """The experts' trainer computes the LM head on the loss tokens only (the speed-up on
    real models, benchmarks/bench_lora.py): its loss and gradients must be the model's own
    (shifted labels, -100 ignored; summed over num_items_in_batch when Trainer gives it)."""
    import torch

    from bdc.disentangle.experts import Collator, ExpertSet, loss_tokens_loss, tokenize

    s = settings(base=base)
    experts = ExpertSet(base, s, "mini")
    experts.add("a", 0)
    batch = Collator(experts.tokenizer.pad_token_id)(
        tokenize(records()[:3], experts.tokenizer, experts.template, s.max_length))
    grads = []
    for loss_of in (lambda: experts.peft(**batch).loss,
                    lambda: loss_tokens_loss(experts.peft, batch),
                    lambda: experts.peft(**batch, num_items_in_batch=7).loss,
                    lambda: loss_tokens_loss(experts.peft, batch, 7)):
        experts.peft.zero_grad()
        loss = loss_of()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in experts.peft.parameters()
                                      if p.requires_grad]))
    for (own, own_grads), (ours, our_grads) in (grads[:2], grads[2:]):
        assert torch.allclose(own, ours, rtol=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7)
                   for a, b in zip(own_grads, our_grads, strict=True))
