"""LoRA training speed on a real model: the experts' trainer (the LM head on the loss tokens
only) against plain PEFT + transformers Trainer (the model's own loss: the head on every
token) on the same data, settings and model, in the same run.

    .venv/bin/python benchmarks/bench_lora.py [--model smollm2-135m-instruct] [--records 48]
        [--precision fp32 bf16] [--shared-prefix]

The data: the pipeline's SFT records (data/explore/sft.jsonl, `dvc repro explore` first),
rendered through the model's own chat template as the experts stage renders them. The model:
a packaged real model (`bdc models prepare NAME` first) or any folder. Prints the tokens per
second of each (the records' non-padding tokens) and its ratio to plain PEFT + Trainer in
fp32 (issue 27's goal: at least 2x), and the most the head on the loss tokens can give on
this model and data by a count of multiply-adds (:func:`ceiling`). The first step of each
is left out of the timing (warm-up).

``--shared-prefix`` measures a third way, the experts stage's with ``experts.shared_prefix``
on (the small and paper profiles'): each P2T record folded into its problem's T2S record,
whose input is the P2T record's input and output (``bdc.disentangle.experts.training_rows``),
so one pass computes both records' loss tokens, with a micro-batch of as many records. Its
rate counts the records' tokens (as if trained apart), so all three rates are the same
records per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def ceiling(config, loss_share: float, mean_length: float) -> float:
    """The highest speed-up that computing the LM head on the loss tokens only can give:
    multiply-adds per token of a step with the head on every token over one with it on the
    loss tokens. A decoder layer's projections (q, k, v, o, the gated MLP) and attention over
    the sequence, and the head (hidden x vocabulary) count once forward and once backward
    (the frozen weights get no gradient; the LoRA's few are left out). Whatever else a step
    does only lowers it."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, config.num_key_value_heads * head_dim
    layer = hidden * q * 2 + hidden * kv * 2 + 3 * hidden * config.intermediate_size \
        + 2 * mean_length * q
    body = config.num_hidden_layers * layer
    head = hidden * config.vocab_size
    return (body + head) / (body + loss_share * head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--records", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                    help="each is measured for both trainers (the model loaded in it; bf16: "
                    "autocast, fast only where the CPU computes bf16 natively); every ratio "
                    "is against plain PEFT + Trainer in fp32, the first measured")
    ap.add_argument("--shared-prefix", action="store_true",
                    help="also the experts' trainer with experts.shared_prefix on: each P2T "
                    "record folded into its T2S record, a micro-batch of as many records")
    args = ap.parse_args()
    from bdc.runtime import configure_environment

    configure_environment()
    import torch

    from bdc.llm.pretraining import fast_bf16

    torch.set_num_threads(2)
    precisions = ["fp32", *[p for p in args.precision if p != "fp32"]]
    rates, bound = {}, None
    for precision in precisions:
        measured, bound = measure(args, precision)
        rates.update(measured)
    first = next(iter(rates.values()))
    print(f"native bf16 on this CPU: {fast_bf16()}")
    for (trainer, precision), rate in rates.items():
        print(f"{trainer:<42} {precision}: {rate:6.0f} tokens/s  {rate / first:.2f}x")
    ours = rates["experts' trainer (head on loss tokens)", "fp32"]
    print(f"ratio: {ours / first:.2f}x at fp32 with the head on the loss tokens (the most that "
          f"can give here, by multiply-adds: {bound:.2f}x)")
    shared = rates.get(("experts' trainer, shared_prefix on", "fp32"))
    if shared:
        print(f"ratio: {shared / first:.2f}x at fp32 with each P2T record folded into its T2S "
              f"record too (experts.shared_prefix, on in the small and paper profiles; goal: "
              f"at least 2x)")


def measure(args, precision: str) -> tuple[dict, float]:
    """Tokens per second of plain PEFT + Trainer and of the experts' trainer, both on the
    model loaded in ``precision``; and :func:`ceiling` for this model and data."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from bdc.config import ExpertsSettings, LoraSettings
    from bdc.disentangle.experts import (
        Collator,
        ExpertSet,
        tokenize,
        train_adapter,
        training_rows,
    )
    from bdc.jsonl import read_jsonl
    from bdc.llm.system1 import template_for

    settings = ExpertsSettings(base=args.model, micro_batch=args.batch, accumulation=1,
                               epochs=1, max_length=args.max_length, save_steps=1_000_000,
                               precision=precision, device="cpu", shared_prefix=False,
                               lora=LoraSettings(r=8, alpha=16, dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
    records = list(read_jsonl("data/explore/sft.jsonl", dict))[:args.records]
    experts = ExpertSet(settings.base, settings, "auto")
    rows = tokenize(records, experts.tokenizer, template_for(experts.tokenizer),
                    settings.max_length)
    tokens = sum(len(r["input_ids"]) for r in rows)
    loss_share = sum(sum(t != -100 for t in r["labels"]) for r in rows) / tokens

    class Clock(TrainerCallback):
        """Seconds from the end of the first step (warm-up) to the end of training."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start

    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        experts.add("plain", settings.seed)
        experts.peft.set_adapter("plain")
        plain = Trainer(model=experts.peft, train_dataset=rows,
                        data_collator=Collator(experts.tokenizer.pad_token_id),
                        args=TrainingArguments(
                            output_dir=f"{tmp}/plain", per_device_train_batch_size=args.batch,
                            num_train_epochs=1, learning_rate=settings.lr, report_to=[],
                            save_strategy="no", disable_tqdm=True, use_cpu=True,
                            bf16=precision == "bf16", seed=settings.seed,
                            data_seed=settings.seed, remove_unused_columns=False,
                            logging_steps=1),
                        callbacks=[clock])
        plain.train()
        timed = {"plain PEFT + Trainer (head on all)": (clock.seconds, plain.state.global_step,
                                                         tokens)}
        experts.add("ours", settings.seed)
        clock = Clock()
        record = train_adapter(experts, "ours", rows, Path(tmp) / "ours", callbacks=[clock])
        timed["experts' trainer (head on loss tokens)"] = (clock.seconds, record["steps"], tokens)
        if args.shared_prefix:
            experts.settings = settings.model_copy(update={"shared_prefix": True})
            shared, micro_batch = training_rows(records, experts)
            experts.add("shared", settings.seed)
            clock = Clock()
            record = train_adapter(experts, "shared", shared, Path(tmp) / "shared",
                                   callbacks=[clock], micro_batch=micro_batch)
            timed["experts' trainer, shared_prefix on"] = (clock.seconds, record["steps"],
                                                           tokens)
            print(f"shared prefix: {len(rows)} records in {len(shared)} rows, "
                  f"{sum(len(r['input_ids']) for r in shared)} tokens a pass instead of {tokens}, "
                  f"{micro_batch} rows a micro-batch")
    print(f"{args.model} ({precision}): {len(rows)} records, {tokens} tokens ({loss_share:.0%} "
          f"carry loss), batch {args.batch}, the first step of each left out as warm-up")
    bound = ceiling(experts.peft.get_base_model().config, loss_share, tokens / len(rows))
    # the records' tokens of the timed steps: all but the first step's share
    return {(name, precision): n * (steps - 1) / steps / seconds
            for name, (seconds, steps, n) in timed.items()}, bound


if __name__ == "__main__":
    main()
