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

from bdc.llm.prompts import CODE_HEADER, parse_steps, program_closed, program_in, render


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

    def written(self, completion: str) -> bool:
        """Whether the program :meth:`parse` takes is complete (more text cannot change it)."""
        return "\n###" in completion.partition(CODE_HEADER)[2]


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

    def trained(self, completion: str) -> bool:
        """Whether the reply is in the trained format: its first fence opens the code
        header's block (a header after another block does not make it one, so neither
        :meth:`parse` nor :meth:`written` changes its mind as the reply goes on)."""
        at = completion.find(self.code_header)
        return at >= 0 and completion.find("```") == at + self.code_header.index("```")

    def parse(self, completion: str) -> tuple[list[str], str]:
        """The plan and the program: in the trained format after the code header; in a
        zero-shot reply (prose, several blocks, a cut-off fence) as :func:`program_in`
        finds it."""
        if self.trained(completion):
            plan, _, rest = completion.partition(self.code_header)
            return parse_steps(plan), rest.split("```", 1)[0]
        return parse_steps(completion.split("```", 1)[0]), program_in(completion)

    def written(self, completion: str) -> bool:
        """Whether the program :meth:`parse` takes is complete (more text cannot change
        it): the trained format's block closed, or (a zero-shot reply) a closed block that
        defines a function, the block :func:`program_in` takes whatever follows."""
        if self.trained(completion):
            return "```" in completion.partition(self.code_header)[2]
        return program_closed(completion)


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


SEGMENT = 32  # new tokens per generate call: between calls, finished rows leave the batch


class ProgramWritten:
    """A stopping criterion (transformers' ``StoppingCriteria`` protocol): row i is done once
    its completion holds the whole program the template's parser takes; what a model writes
    after it (prose, example usage, a second block) is never read, so it is never generated."""

    def __init__(self, tokenizer, template, prompt_length: int) -> None:
        self.tokenizer, self.template, self.start = tokenizer, template, prompt_length
        self.lengths: dict[int, int] = {}  # row of this call's batch -> new tokens, when done

    def __call__(self, input_ids, scores=None, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        done = [self.template.written(t) for t in texts]
        for i in (i for i, d in enumerate(done) if d):  # the first step it held (a stopped
            self.lengths.setdefault(i, input_ids.shape[1] - self.start)  # row is padded)
        return torch.tensor(done, device=input_ids.device)


def generate_rows(model, tokenizer, template, enc, per_row: dict, max_new_tokens: int,
                  segment: int = SEGMENT, **generate_kwargs) -> list:
    """Each row's new tokens (up to and with its end of text, or up to where its program was
    written). A static batch computes every row until its longest one ends: on a CPU, with a
    few replies running to the token limit, most of a batch's steps were spent on rows
    already finished. So generation runs in
    segments of ``segment`` tokens, continuing from the KV cache (transformers' cache reuse),
    and between segments the rows that ended (end of text, or :class:`ProgramWritten`) leave
    the batch and the cache. ``per_row``: generate arguments with one entry per row
    (``adapter_names``, ``z``), cut along with the rows."""
    import torch

    ids, mask = enc["input_ids"], enc["attention_mask"]
    prompt_length = ids.shape[1]
    stop = ProgramWritten(tokenizer, template, prompt_length)
    ends = torch.tensor([t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id}
                         if t is not None], device=ids.device)
    rows = list(range(len(ids)))  # each row of the current batch: its place in ``enc``
    done: dict[int, torch.Tensor] = {}
    cache = None
    while True:
        written = ids.shape[1] - prompt_length
        stop.lengths = {}
        out = model.generate(input_ids=ids, attention_mask=mask, cache=cache,
                             max_new_tokens=min(segment, max_new_tokens - written),
                             stopping_criteria=[stop], return_dict_in_generate=True,
                             **per_row, **generate_kwargs)
        seq, cache = out.sequences, out.cache
        ended = torch.isin(seq[:, ids.shape[1]:], ends).any(1) | stop(seq)
        if seq.shape[1] - prompt_length >= max_new_tokens:
            ended[:] = True
        for i in ended.nonzero().flatten().tolist():
            new = seq[i, prompt_length:]
            done[rows[i]] = new[:stop.lengths[i]] if i in stop.lengths else trim(new, ends)
        keep = (~ended).nonzero().flatten()
        if not len(keep):
            return [done[i] for i in range(len(enc["input_ids"]))]
        cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(mask), seq.shape[1] - mask.shape[1])], 1)
        ids, mask = seq[keep], mask[keep]
        kept = keep.tolist()
        rows = [rows[i] for i in kept]
        per_row = {k: v[keep.to(v.device)] if isinstance(v, torch.Tensor) else
                   [v[i] for i in kept] for k, v in per_row.items()}


def trim(tokens, ends):
    """``tokens`` up to and with the first end token (``ends``: a tensor of token ids; what
    follows it is padding)."""
    import torch

    at = torch.isin(tokens, ends).nonzero()
    return tokens if not len(at) else tokens[:int(at[0]) + 1]


def solve(model, tokenizer, template, problems: list[str], max_new_tokens: int,
          batch_size: int, adapter_names: list[str] | None = None,
          temperature: float | None = None, seed: int = 0, z=None,
          on_batch=None, segment: int = SEGMENT) -> list[tuple[list[str], str]]:
    """One pass per problem (greedy, or sampled at ``temperature``): ``(thoughts,
    program)``. With ``adapter_names``, row i runs adapter ``adapter_names[i]`` (PEFT's
    mixed-adapter batches; ``__base__`` for the base model alone); with ``z`` (an array, one
    row per problem), ``model`` is a customized solver gated by row i's z. ``on_batch(start,
    results, tokens)`` sees each batch as it is done (programs can run meanwhile). A reply
    stops at its end of text or once its program is written (:class:`ProgramWritten`)."""
    import torch

    torch.manual_seed(seed)
    model.eval()
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} \
        if temperature else {"do_sample": False}
    out = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        enc = tokenizer([template.prompt(p) for p in chunk], return_tensors="pt",
                        padding=True).to(model.device)
        per_row = {} if adapter_names is None else \
            {"adapter_names": adapter_names[start:start + batch_size]}
        if z is not None:
            per_row["z"] = torch.as_tensor(z[start:start + batch_size])
        with torch.no_grad():
            new = generate_rows(model, tokenizer, template, enc, per_row, max_new_tokens,
                                segment, **sampling, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        results = [template.parse(t) for t in
                   tokenizer.batch_decode([n.tolist() for n in new], skip_special_tokens=True)]
        if on_batch:
            on_batch(start, results, [len(n) for n in new])
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
