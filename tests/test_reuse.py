"""The one reuse mechanism (bdc.reuse): a result is reused only when everything that made it
is unchanged and its files are still as they were saved."""

from __future__ import annotations

import json

import pytest

from bdc.reuse import TRAINING_RECORD, code_version, digest, finished, identity, seal


def test_a_sealed_result_is_reused_only_while_its_files_are_intact(tmp_path, caplog):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"w" * 1000)
    (folder / "sub" / "config.json").write_text("{}")
    record = seal(folder, {"fingerprint": "abc", "steps": 3})
    assert set(record["files"]) == {"weights.bin", "sub/config.json"}
    assert finished(folder, "abc") == record
    assert finished(folder, "other") is None  # anything else made it: not this result
    (folder / "weights.bin").write_bytes(b"w" * 999)  # truncated
    with caplog.at_level("WARNING"):
        assert finished(folder, "abc") is None
    assert str(folder / "weights.bin") in caplog.text
    (folder / "weights.bin").write_bytes(b"w" * 1000)
    assert finished(folder, "abc") == record  # the same bytes again
    (folder / "sub" / "config.json").unlink()
    assert finished(folder, "abc") is None


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", json.dumps({"fingerprint": "abc"})])
def test_a_record_that_cannot_vouch_for_its_files_is_not_reused(tmp_path, text):
    """No record, a broken one, or one without checksums (written before they existed):
    nothing says the weights are whole, so they are made again."""
    (tmp_path / TRAINING_RECORD).write_text(text)
    assert finished(tmp_path, "abc") is None


def test_identity_is_the_training_fingerprint_of_a_model_made_here(tmp_path):
    seal(tmp_path, {"fingerprint": "f1"})
    assert identity(tmp_path) == "f1" and identity("acme/model") == "acme/model"


def test_digest_is_stable_and_key_order_free():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_every_trained_result_has_its_code_in_its_fingerprint(monkeypatch):
    """Bug: the experts' and the hypernetwork's reuse keys held settings and data but no
    code, so a changed training loop reused the old weights. Each maker of weights names
    the code it hashes; those parts exist (a renamed file would hash nothing)."""
    from bdc.boost.records import TREE_CODE
    from bdc.customize.training import HYPERNET_CODE
    from bdc.disentangle.experts import EXPERT_CODE
    from bdc.llm.mini_models import PRETRAIN_CODE
    from bdc.reuse import PACKAGE

    for parts in (TREE_CODE, HYPERNET_CODE, EXPERT_CODE, PRETRAIN_CODE):
        assert all((PACKAGE / part).exists() for part in parts), parts
        assert code_version(parts) == code_version(parts)


def test_a_change_to_the_training_code_changes_each_fingerprint(tmp_path, monkeypatch):
    import numpy as np

    import bdc.customize.training as hypernet
    import bdc.disentangle.experts as experts
    import bdc.llm.mini_models as mini_models
    from bdc.config import ExpertsSettings, Params, PretrainModel
    from bdc.problems import mini

    (tmp_path / "clusters").mkdir()
    np.save(tmp_path / "clusters" / "centroids.npy", np.zeros((2, 3)))
    (tmp_path / "clusters" / "embedder.json").write_text(json.dumps({"identity": "e"}))
    corpus = mini.load(slice="pretrain", limit=1).problems
    params = Params()
    makers = {
        mini_models: lambda: mini_models.fingerprint(
            params.tiny_model, PretrainModel(role="base", steps=1), 1, params, 0, corpus),
        experts: lambda: experts.fingerprint("full", "base", ExpertsSettings(), "mini", []),
        hypernet: lambda: hypernet.fingerprint(params, tmp_path / "experts", ["cluster_0"],
                                               tmp_path / "clusters", []),
    }
    for module, fingerprint in makers.items():
        before = fingerprint()
        monkeypatch.setattr(module, "code_version", lambda parts: "edited")
        assert fingerprint() != before, module.__name__
        monkeypatch.undo()
        assert fingerprint() == before
