"""System-1 generation in segments (``bdc.llm.system1.generate_rows``): finished rows leave
the batch between segments, and a reply stops once its program is written. Before this, a
static batch computed every row until its longest one ended: on the small profile most
steps went to rows already finished (benchmarks/bench_segments.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bdc.llm.prompts import CODE_HEADER

SAMPLES = [json.loads(line) for line in
           (Path(__file__).parent / "fixtures/real_samples.jsonl").read_text().splitlines()]


class Tokenizer:  # what the chat template reads of a tokenizer
    eos_token = "<|im_end|>"


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s["model"] == "smollm2-135m-instruct"],
                         ids=lambda s: s["problem_id"])
def test_a_reply_stopped_where_its_program_is_written_gives_the_same_program(sample):
    """Stopping early must never change what the parser takes: cut each real reply at the
    first character where the template says the program is written; the program of the cut
    reply is the whole reply's."""
    from bdc.llm.system1 import ChatTemplate

    template = ChatTemplate(Tokenizer())
    text = sample["completion"]
    cut = next((i for i in range(1, len(text) + 1) if template.written(text[:i])), None)
    if cut is None:  # never written: the whole reply was generated, as before
        return
    assert template.parse(text[:cut]) == template.parse(text)


def test_when_a_program_is_written():
    from bdc.llm.system1 import ChatTemplate, MiniTemplate

    chat = ChatTemplate(Tokenizer())
    head = "Plan:\n1. add\n\n" + chat.code_header + "def f(x):\n    return x + 1\n"
    assert not chat.written(head) and chat.written(head + "```")
    usage = "```python\nprint(f(2))\n```\n"  # a block with no function does not end it
    assert not chat.written(usage) and not chat.written(usage + "```python\ndef f(x):\n")
    assert chat.written(usage + "```python\ndef f(x):\n    return 1\n```")
    # a closed block, then the trained header: the reply stays zero-shot, its program f
    first = "```python\ndef f(x):\n    return x\n```\n"
    later = first + chat.code_header + "def g(x):\n    return 2\n```"
    assert chat.written(first) and chat.parse(first) == chat.parse(later)
    mini = MiniTemplate("</s>")
    assert not mini.written("1. add\n" + CODE_HEADER + "def f(x):\n    return x\n")
    assert mini.written("1. add\n" + CODE_HEADER + "def f(x):\n    return x\n\n###")


def test_finished_rows_leave_the_batch_and_each_row_keeps_its_own_state(solver_model):
    """Between segments the finished rows are cut out of the batch, the KV cache, the mask
    and the per-row arguments (each row's adapter). A wrong cut (a row given another's cache
    or adapter, a mask one token off) writes other tokens: greedy, the segmented run must
    write what one static call writes, row for row, while its batches shrink."""
    import torch
    from peft import LoraConfig, get_peft_model

    from bdc.llm.loading import load_causal_lm
    from bdc.llm.system1 import generate_rows, template_for
    from bdc.problems import mini

    model, tokenizer = load_causal_lm(str(solver_model))
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft = get_peft_model(model, config, adapter_name="a").eval()
    peft.add_adapter("b", config)
    template = template_for(tokenizer, "mini")
    prompts = [template.prompt(p.prompt) for p in mini.load(slice="test", limit=2).problems]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    names = [["a", "b", "__base__"][i * 3 // len(prompts)] for i in range(len(prompts))]
    sizes: list[int] = []
    generate = peft.generate

    def counting(*args, **kwargs):
        sizes.append(len(kwargs["input_ids"]))
        return generate(*args, **kwargs)

    peft.generate = counting

    def run(segment: int) -> list[list[int]]:
        with torch.no_grad():
            rows = generate_rows(peft, tokenizer, template, enc, {"adapter_names": names},
                                 48, segment, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return [r.tolist() for r in rows]

    static = run(48)
    assert sizes == [len(prompts)]
    sizes.clear()
    segmented = run(4)
    assert sizes[0] == len(prompts) and min(sizes) < len(prompts)  # rows left the batch
    assert len({len(r) for r in static}) > 1  # rows really ended at different points
    # each row ends at its end of text, at the limit, or at the token that wrote its
    # program: not one token later (a stopped row is padded; the padding is not counted)
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for row in segmented:
        text = tokenizer.decode(row, skip_special_tokens=True)
        assert row[-1] in ends or len(row) == 48 or (
            template.written(text) and not template.written(
                tokenizer.decode(row[:-1], skip_special_tokens=True)))
    same = sum(a == b for a, b in zip(static, segmented, strict=True))
    # a greedy near-tie can flip under another batch shape on some CPU: not a row set
    assert same >= len(prompts) - 1, (same, len(prompts))
