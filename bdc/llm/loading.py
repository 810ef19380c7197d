"""Load any Hugging Face causal LM (hub id or local folder) ready for batched generation.

Left padding, because batched generation appends new tokens on the right: with right padding
the shorter prompts would continue after their pad tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

from bdc.errors import BDCError


class ModelLoadError(BDCError, RuntimeError):
    """A model or tokenizer cannot be loaded; the message says which and why."""


def resolve_dtype(name: str | None):
    """A ``torch.dtype`` from its name; None means the checkpoint's own."""
    if name in (None, "auto"):
        return None
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[name]
    except KeyError as exc:
        raise ModelLoadError(f"unknown dtype {name!r}: use float32, bfloat16 or float16") from exc


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, "tokenizer")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str | Path, device: str = "cpu", dtype: str | None = None):
    """``(model, tokenizer)`` in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name_or_path)
    kwargs = {"dtype": resolve_dtype(dtype)} if dtype not in (None, "auto") else {}
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, "model", **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def model_location(name_or_path: str | Path) -> str:
    """Where a model setting points: a local folder as it is; a packaged model's name
    (``params.yaml`` ``models:``, prepared by ``bdc models prepare``) its converted folder;
    anything else unchanged (a hub id). Every engine (transformers, vLLM) loads from this."""
    from bdc.llm.packaged import converted

    local = Path(name_or_path).expanduser()
    if local.exists():
        return str(local)
    folder = converted(str(name_or_path))
    return str(folder) if folder is not None else str(name_or_path)


def _from_pretrained(cls, name_or_path: str | Path, what: str, **kwargs):
    local = Path(model_location(name_or_path))
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"{local}: a model path must be a folder in Hugging Face format")
        source = str(local)
    else:
        source = str(name_or_path)
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        if local.exists():
            raise ModelLoadError(f"cannot load the {what} from {local}: {exc}") from exc
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"cannot load the {what} {source!r}: it is not a local folder and the Hugging Face "
            + ("hub is disabled (HF_HUB_OFFLINE=1). " if offline else "hub did not provide it. ")
            + "Pass a local model folder, prepare a packaged model named in params.yaml "
            "(`bdc models prepare NAME`), or run where the hub is reachable with "
            "HF_HUB_OFFLINE=0 to download it into HF_HOME first.") from exc
