"""The System-1 solver's one prompt template and inference recipe, shared by every stage that
trains or runs it (experts, customize, evaluate, ``bdc solve``).

Recipe (chosen once): **one pass**. The solver is prompted with the problem and writes its
thoughts, then its code, in a single generation. Training teaches exactly that text, split
into the paper's two records at the code header:

- P2T: input = the prompt, output = the thoughts *and the code header* (no end of text, so a
  tuned model goes on to write code: with the header in the input instead, tuned tiny models
  stopped before it and wrote no code in 88-100% of completions, mini-calibration);
- T2S: input = the prompt, the thoughts and the header, output = the program and the end of
  text.

Concatenated, P2T input + output = T2S input, and T2S input + output = the whole one-pass
text: training and inference see the same strings. Two templates: ``mini`` (the tiny models'
own ``### Problem / ### Thoughts / ### Code`` format) and ``chat`` (the base model's chat
template: the problem as the user turn, thoughts and code as the assistant's).
"""

from __future__ import annotations

from dataclasses import dataclass

from bdc.llm.prompts import CODE_HEADER, parse_steps, program_in, render


@dataclass(frozen=True)
class Example:
    """One supervised record as text: loss on ``output`` only."""

    input: str
    output: str


def numbered(thoughts: list[str]) -> str:
    return "".join(f"{i}. {t}\n" for i, t in enumerate(thoughts, 1))


class MiniTemplate:
    """The tiny models' text format."""

    name = "mini"

    def __init__(self, eos: str) -> None:
        self.eos = eos

    def prompt(self, problem: str) -> str:
        return render(problem)

    def p2t(self, problem: str, thoughts: list[str]) -> Example:
        return Example(render(problem), numbered(thoughts) + CODE_HEADER)

    def t2s(self, problem: str, thoughts: list[str], program: str) -> Example:
        return Example(render(problem, thoughts), program + self.eos)

    def parse(self, completion: str) -> tuple[list[str], str]:
        """The thoughts and the program of a one-pass completion."""
        if CODE_HEADER not in completion:
            return parse_steps(completion), ""
        plan, code = completion.split(CODE_HEADER, 1)
        return parse_steps(plan), code.split("\n###", 1)[0]


class ChatTemplate:
    """An instruction-tuned base model: its own chat template around the same content."""

    name = "chat"
    code_header = "Code:\n```python\n"
    instruction = ("Solve the programming problem. First write your plan as numbered steps, "
                   "then the code.")

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def prompt(self, problem: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{self.instruction}\n\n{problem}"}], tokenize=False,
            add_generation_prompt=True)

    def p2t(self, problem: str, thoughts: list[str]) -> Example:
        return Example(self.prompt(problem), "Plan:\n" + numbered(thoughts) + "\n"
                       + self.code_header)

    def t2s(self, problem: str, thoughts: list[str], program: str) -> Example:
        head = self.p2t(problem, thoughts)
        return Example(head.input + head.output,
                       program.rstrip("\n") + "\n```" + (self.tokenizer.eos_token or ""))

    def parse(self, completion: str) -> tuple[list[str], str]:
        """The plan and the program: in the trained format after the code header; in a
        zero-shot reply (prose, several blocks, a cut-off fence) as :func:`program_in`
        finds it."""
        plan, header, rest = completion.partition(self.code_header)
        if header:
            return parse_steps(plan), rest.split("```", 1)[0]
        return parse_steps(completion.split("```", 1)[0]), program_in(completion)


def template_for(tokenizer, kind: str = "auto") -> MiniTemplate | ChatTemplate:
    """``chat`` for a tokenizer with a chat template, else ``mini`` (or as asked)."""
    if kind == "auto":
        kind = "chat" if getattr(tokenizer, "chat_template", None) else "mini"
    return ChatTemplate(tokenizer) if kind == "chat" else MiniTemplate(tokenizer.eos_token)


def examples(record: dict, template: MiniTemplate | ChatTemplate) -> Example:
    """The text of one SFT record (its ``task`` says which half of the one pass it is)."""
    if record["task"] == "p2t":
        return template.p2t(record["prompt"], record["thoughts"])
    return template.t2s(record["prompt"], record["thoughts"], record["program"])


def solve(model, tokenizer, template, problems: list[str], max_new_tokens: int,
          batch_size: int, adapter_names: list[str] | None = None,
          temperature: float | None = None, seed: int = 0, z=None,
          on_batch=None) -> list[tuple[list[str], str]]:
    """One pass per problem (greedy, or sampled at ``temperature``): ``(thoughts,
    program)``. With ``adapter_names``, row i runs adapter ``adapter_names[i]`` (PEFT's
    mixed-adapter batches; ``__base__`` for the base model alone); with ``z`` (an array, one
    row per problem), ``model`` is a customized solver gated by row i's z. ``on_batch(start,
    results, tokens)`` sees each batch as it is done (programs can run meanwhile)."""
    import torch

    torch.manual_seed(seed)
    model.eval()
    out = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        enc = tokenizer([template.prompt(p) for p in chunk], return_tensors="pt",
                        padding=True).to(model.device)
        extra = {} if adapter_names is None else \
            {"adapter_names": adapter_names[start:start + batch_size]}
        if z is not None:
            extra["z"] = torch.as_tensor(z[start:start + batch_size])
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} \
            if temperature else {"do_sample": False}
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, **sampling, **extra,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        new = ids[:, enc["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        results = [template.parse(t) for t in texts]
        if on_batch:
            ends = (new == tokenizer.pad_token_id) | (new == tokenizer.eos_token_id)
            lengths = torch.where(ends.any(1), ends.float().argmax(1) + 1, new.shape[1])
            on_batch(start, results, lengths.tolist())
        out += results
    return out


def solve_served(server, template, problems: list[str], adapters: list, max_new_tokens: int,
                 temperature: float | None = None,
                 seed: int = 0) -> tuple[list[tuple[list[str], str]], list[int]]:
    """:func:`solve` through a vLLM server (:class:`bdc.llm.vllm_server.VLLMServer`): the same
    prompt and parse, one request per problem on its own adapter (``adapters[i]``: a
    :class:`~bdc.llm.vllm_server.Adapter`, or None for the base). Returns the ``(thoughts,
    program)`` pairs and each completion's token count."""
    import asyncio

    from bdc.llm.base import Request

    requests = [Request(prompt=template.prompt(p), temperature=temperature or 0.0,
                        max_tokens=max_new_tokens, seed=seed * 1000003 + i)
                for i, p in enumerate(problems)]
    done = asyncio.run(server.run(requests, adapters))
    return ([template.parse(c.generations[0].text) for c in done],
            [c.completion_tokens for c in done])
