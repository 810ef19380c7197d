"""Local models: build a tiny Llama with the CLI, load it through the normal loader, generate
in a batch, wrap it with PEFT; hub ids fail clearly offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bdc.config import TinyModelSettings
from bdc.llm.loading import ModelLoadError, load_causal_lm
from bdc.llm.tiny import build_tiny_model

BDC = str(Path(sys.executable).parent / "bdc")
SMALL = TinyModelSettings(hidden_size=32, layers=2, heads=2, intermediate_size=64,
                          vocab_size=300, max_positions=128)
CORPUS = ["def add(a, b):\n    return a + b\n", "def neg(x):\n    return -x\n"] * 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", SMALL, CORPUS, seed=0)


def test_cli_builds_standard_hugging_face_folder(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    params = tmp_path / "params.yaml"
    params.write_text("tiny_model: {hidden_size: 32, layers: 1, heads: 2, "
                      "intermediate_size: 64, vocab_size: 300}\n")
    subprocess.run([BDC, "tiny-model", "--out", str(tmp_path / "m"), "--corpus", str(corpus),
                    "--params", str(params)], check=True, capture_output=True, timeout=300)
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    model, _ = load_causal_lm(tmp_path / "m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 1


def test_loader_batches_with_left_padding(tiny):
    model, tok = load_causal_lm(tiny)
    assert tok.padding_side == "left" and tok.pad_token is not None
    batch = tok(["def add(a, b):", "x"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # the short prompt is padded on the left
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_same_seed_same_weights(tmp_path):
    a = build_tiny_model(tmp_path / "a", SMALL, CORPUS, seed=3)
    b = build_tiny_model(tmp_path / "b", SMALL, CORPUS, seed=3)
    ma, _ = load_causal_lm(a)
    mb, _ = load_causal_lm(b)
    for (na, pa), (_, pb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na


def test_peft_lora_wraps_the_tiny_model(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = load_causal_lm(tiny)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                               "v_proj"]))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in lora.parameters())
    batch = tok(["def add(a, b):"], return_tensors="pt")
    loss = lora(**batch, labels=batch["input_ids"]).loss
    loss.backward()


def test_missing_folder_and_offline_hub_id_fail_clearly(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelLoadError, match="not-a-model"):
        load_causal_lm(tmp_path / "not-a-model")
    code = ("from bdc.llm.loading import load_causal_lm, ModelLoadError\n"
            "try:\n    load_causal_lm('meta-llama/Llama-3.1-8B-Instruct')\n"
            "except ModelLoadError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120).stdout
    assert "ERR cannot load the tokenizer 'meta-llama/Llama-3.1-8B-Instruct'" in out
    assert "HF_HUB_OFFLINE=1" in out
