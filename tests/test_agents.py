"""Agents and backends: lenient parsing, transformers batching, the HTTP client against real
local servers (``bdc serve`` over a tiny model, and a provider-like server that rate-limits),
vLLM when installed."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from bdc.boost.agents.llm import (
    ChatStyle,
    CompletionStyle,
    LLMAgent,
    MiniStyle,
    Sampling,
    parse_thoughts,
)
from bdc.config import TinyModelSettings
from bdc.llm.backends import HFBackend, HTTPSettings, OpenAIBackend
from bdc.llm.base import Backend, BackendError, Completion, Generation, Request
from bdc.llm.prompts import program_in
from bdc.llm.tiny import build_tiny_model
from bdc.llm.vllm_server import free_port
from bdc.problems.format import CallTest, Problem
from bdc.problems.format import Tests as ProblemTests
from tests.conftest import bdc_serve

SMALL = TinyModelSettings(hidden_size=32, layers=1, heads=2, intermediate_size=64,
                          vocab_size=300, max_positions=128)
CORPUS = ["### Problem\nAdd one.\n### Thoughts\n1. Add one.\n### Code\ndef f(x):\n"
          "    return x + 1\n"] * 30
VIEW = Problem(id="p", source="t", prompt="Add one.", kind="function", entry_point="f",
               tests=ProblemTests(public=[CallTest(input=[1], output=2)],
                           hidden=[CallTest(input=[5], output=6)])).public_view()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", SMALL, CORPUS, seed=0)


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, expected", [
    ('{"thoughts": [{"thought": "sort it", "prior": 0.8}], "done": false}', [("sort it", 0.8)]),
    ('Sure!\n```json\n{"thoughts": [{"text": "a", "confidence": 70}]}\n```', [("a", 0.7)]),
    ("[{'thought': 'b', 'prior': 2.5}, 'c']", [("b", 0.025), ("c", 0.5)]),
    ('{"thought": "only one", "prior": "high"}', [("only one", 0.5)]),
])
def test_thoughts_parse_leniently(text, expected):
    reply = parse_thoughts(text, 2)
    assert not reply.fallback
    assert [(t.text, pytest.approx(t.prior)) for t in reply.thoughts] == expected


def test_unusable_replies_are_recorded_not_raised():
    assert parse_thoughts("I think we should loop.", 3).fallback == "no JSON in the reply"
    assert parse_thoughts('{"thoughts": []}', 3).fallback == "JSON without thoughts"
    assert parse_thoughts('{"thoughts": [], "done": true}', 3).done
    assert program_in("text\n```python\ndef f():\n    return 1\n```\nbye") == \
        "def f():\n    return 1\n"


class CannedBackend(Backend):
    """Replies from a list, for the agent's retry logic (no model needed to test it)."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self.texts, self.requests = texts, []

    async def generate(self, request: Request) -> Completion:
        self.requests.append(request)
        return Completion([Generation(self.texts.pop(0), tokens=5)], prompt_tokens=10,
                          completion_tokens=5)


def test_a_bad_reply_is_retried_once_with_another_seed_then_falls_back():
    good = CannedBackend(["nonsense", '{"thoughts": ["x"]}'])
    agent = LLMAgent("a", good, ChatStyle(), Sampling())
    reply = asyncio.run(agent.propose(VIEW, [], 2, seed=1))
    assert [t.text for t in reply.thoughts] == ["x"] and not reply.fallback
    assert reply.tokens == 30 and good.requests[0].seed != good.requests[1].seed
    bad = CannedBackend(["nonsense", "still nonsense"])
    reply = asyncio.run(LLMAgent("b", bad, ChatStyle(), Sampling()).propose(VIEW, [], 2, 1))
    assert reply.thoughts == [] and reply.fallback == "no JSON in the reply"
    assert len(bad.requests) == 2  # bounded: one retry


def test_chat_prompts_show_public_tests_and_feedback_only():
    style = ChatStyle()
    text = style.propose(VIEW, ["add"], 3, Sampling(), 0).prompt[1][1]
    assert "f(*[1]) == 2" in text and "[5]" not in text and "1. add" in text
    from bdc.boost.agents.base import Feedback

    refine = style.refine(VIEW, [], "add", [Feedback([1], 2, {"repr": "{3}"})], Sampling(),
                          0).prompt[1][1]
    assert "expected: 2" in refine and "got: {3}" in refine and "1. add" in refine


# ----------------------------------------------------------------------------- transformers

def test_hf_backend_sampling_does_not_depend_on_the_batch(tiny):
    backend = HFBackend(tiny, batch_size=16)
    ask = Request("### Problem\nAdd one.\n### Thoughts\n", n=3, temperature=1.0, max_tokens=12,
                  stop=("\n",), seed=5, logprobs=True)
    others = [Request(f"### Problem\nOther {i}.\n", n=2, temperature=1.0, max_tokens=12,
                      stop=("\n",), seed=i) for i in range(4)]

    async def alone():
        return await backend.generate(ask)

    async def crowded():
        results = await asyncio.gather(*[backend.generate(r) for r in [*others, ask]])
        return results[-1]

    a, b = asyncio.run(alone()), asyncio.run(crowded())
    assert a.prompt_tokens == b.prompt_tokens > 0  # the prompt once, not once per row
    assert a.completion_tokens == sum(g.tokens for g in a.generations)
    a, b = a.generations, b.generations
    assert [g.text for g in a] == [g.text for g in b]
    assert all(g.logprob == pytest.approx(h.logprob, abs=1e-3) for g, h in zip(a, b,
                                                                               strict=True))
    assert all(g.logprob < 0 and 1 <= g.tokens <= 12 and "\n" not in g.text[:-1]
               for g in a)
    assert backend.usage.calls == 1 + 5 and backend.usage.completion_tokens > 0


def test_hf_log_probabilities_of_chosen_tokens_equal_the_full_logits_way(tiny):
    """The backend keeps one log-probability per step (not rows x vocabulary logits for
    every step, tens of GB at 8B with a 128k vocabulary); the values must be the same."""
    import torch

    backend = HFBackend(tiny, batch_size=8)
    ask = Request("### Problem\nAdd one.\n### Thoughts\n", n=3, temperature=0.0,
                  max_tokens=10, seed=1, logprobs=True)
    gens = asyncio.run(backend.generate(ask)).generations
    tok, model = backend.tokenizer, backend.model
    enc = tok([ask.prompt] * 3, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    full = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
    expected = full.gather(-1, new.unsqueeze(-1)).squeeze(-1)
    for row, g in enumerate(gens):
        assert g.token_logprobs == pytest.approx(expected[row, :g.tokens].tolist(), abs=1e-5)


def test_seeded_sampling_rows_are_independent_across_noise_blocks(monkeypatch):
    import torch

    from bdc.llm.backends import SeededSampling

    def run(seeds, temps, steps=40, vocab=7):
        proc = SeededSampling(seeds, temps)
        scores = torch.arange(vocab, dtype=torch.float32).repeat(len(seeds), 1)
        return [proc(None, scores) for _ in range(steps)], scores

    alone, _ = run([11], [0.7])
    crowd, scores = run([3, 11, 4], [1.0, 0.7, 0.0])  # 40 steps: three noise blocks
    assert all(torch.equal(a[0], c[1]) for a, c in zip(alone, crowd, strict=True))
    assert all(torch.equal(c[2], scores[2]) for c in crowd)  # greedy row untouched
    assert not torch.equal(crowd[0][0], crowd[1][0])  # fresh noise every step
    monkeypatch.setattr(SeededSampling, "BUFFER", 10)  # a huge vocabulary: one step a block
    small, _ = run([11], [0.7])
    assert all(torch.allclose(a, b) for a, b in zip(alone, small, strict=True))


def test_mini_style_agent_on_a_local_model(tiny):
    agent = LLMAgent("a", HFBackend(tiny, 8), MiniStyle(), Sampling(0.8, 12, 24))
    reply = asyncio.run(agent.propose(VIEW, [], 3, seed=0))
    assert reply.tokens > 0 and (reply.thoughts or reply.done or reply.fallback)
    assert all(0 < t.prior <= 1 for t in reply.thoughts)
    written = asyncio.run(agent.write(VIEW, ["Add one."], 2, seed=0))
    assert len(written.programs) == 2


# ----------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def served(tiny):
    """``bdc serve`` in its own process: the protocol over a real socket."""
    with bdc_serve(tiny, "tiny") as url:
        yield url


def test_http_agent_against_a_local_openai_compatible_server(served, tiny):
    async def go():
        backend = OpenAIBackend(HTTPSettings(base_url=served, model="tiny", api_key_env=None,
                                             max_concurrency=4))
        agent = LLMAgent("h", backend, MiniStyle(), Sampling(0.8, 12, 24))
        try:
            replies = await asyncio.gather(*[agent.propose(VIEW, [], 2, seed=s)
                                             for s in range(6)])
            written = await agent.write(VIEW, ["Add one."], 2, seed=0)
        finally:
            await backend.aclose()
        return backend, replies, written

    backend, replies, written = asyncio.run(go())
    assert backend.usage.calls >= 7 and backend.usage.completion_tokens > 0
    assert all(0 < t.prior <= 1 for r in replies for t in r.thoughts)
    assert len(written.programs) == 2
    # the same request over HTTP and in-process: the same text (seeded sampling)
    local = asyncio.run(HFBackend(tiny).generate(
        MiniStyle().write(VIEW, ["Add one."], 2, Sampling(0.8, 12, 24), 0)))
    assert [g.text for g in local.generations] == [p for p in written.programs]
    assert written.tokens == local.tokens  # served or in-process: the same count


def test_bdc_serve_with_the_official_openai_client(served):
    """The `openai` package against `bdc serve`: completions work; a chat request to a model
    without a chat template, and stream=True, answered HTTP 500 with a server traceback;
    they are the client's errors: 400 with the reason (BadRequestError)."""
    import openai

    client = openai.OpenAI(base_url=served, api_key="unused", max_retries=0)
    done = client.completions.create(model="tiny", prompt="# add one\n", max_tokens=8,
                                     temperature=0.0)
    assert done.choices[0].text and done.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="tiny", max_tokens=8,
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="does not stream"):
        client.completions.create(model="tiny", prompt="x", max_tokens=8, stream=True)
    # another model's name: 404, as vLLM's server answers (it answered 200 with this model)
    with pytest.raises(openai.NotFoundError, match="The model `wrong` does not exist"):
        client.completions.create(model="wrong", prompt="x", max_tokens=4)
    # the server is still up and answers the next request
    assert client.completions.create(model="tiny", prompt="x", max_tokens=4).choices


# Anthropic's OpenAI-compatibility endpoint refuses n > 1 (and ignores seed) like this
ANTHROPIC_N_ERROR = {"type": "error", "error": {
    "type": "invalid_request_error", "message": "n: only n=1 is supported"}}


class ProviderLike:
    """A server speaking the chat protocol the way providers fail: rate limits first; with
    ``max_n``, the way Anthropic's compatibility endpoint refuses more generations."""

    def __init__(self, fail_first: int, status: int = 429, delay: float = 0.0,
                 max_n: int | None = None,
                 content: str = '{"thoughts": [{"thought": "t", "prior": 0.9}]}') -> None:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.seen: list[dict] = []

        async def chat(request):
            body = await request.json()
            self.seen.append({"auth": request.headers.get("authorization"), "body": body})
            await asyncio.sleep(delay)
            if len(self.seen) <= fail_first:
                return JSONResponse({"error": "slow down"}, status_code=status,
                                    headers={"retry-after": "0"})
            n = body.get("n", 1)
            if max_n is not None and n > max_n:
                return JSONResponse(ANTHROPIC_N_ERROR, status_code=400)
            return JSONResponse({"choices": [{"index": i, "message": {
                "role": "assistant", "content": content}, "finish_reason": "stop"}
                for i in range(n)], "usage": {"prompt_tokens": 100,
                                              "completion_tokens": 20 * n}})

        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
            host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def chat_agent(url: str, **kw) -> LLMAgent:
    settings = HTTPSettings(base_url=url, model="m", api_key_env="BDC_TEST_KEY",
                            backoff_s=0.01, price_input_per_mtok=1.0,
                            price_output_per_mtok=4.0, **kw)
    return LLMAgent("c", OpenAIBackend(settings), ChatStyle(), Sampling())


def test_rate_limits_are_retried_and_costs_counted(monkeypatch):
    monkeypatch.setenv("BDC_TEST_KEY", "sk-test")
    with ProviderLike(fail_first=2) as url:
        agent = chat_agent(url)
        reply = asyncio.run(agent.propose(VIEW, [], 2, 0))
    assert [t.text for t in reply.thoughts] == ["t"]
    usage = agent.usage
    assert usage.retries == 2 and usage.calls == 1
    assert usage.cost == pytest.approx((100 * 1.0 + 20 * 4.0) / 1e6)


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("BDC_TEST_KEY", "sk-secret")
    server = ProviderLike(fail_first=0)
    with server as url:
        asyncio.run(chat_agent(url).propose(VIEW, [], 2, 0))
    assert server.seen[0]["auth"] == "Bearer sk-secret"
    assert server.seen[0]["body"]["model"] == "m" and "sk-secret" not in json.dumps(
        server.seen[0]["body"])


def test_client_errors_fail_at_once_and_timeouts_give_up(monkeypatch):
    monkeypatch.delenv("BDC_TEST_KEY", raising=False)
    bad = ProviderLike(fail_first=5, status=400)
    with bad as url, pytest.raises(BackendError, match="HTTP 400"):
        asyncio.run(chat_agent(url).propose(VIEW, [], 2, 0))
    assert len(bad.seen) == 1
    with ProviderLike(fail_first=0, delay=2.0) as url, \
            pytest.raises(BackendError, match="gave up after 2 attempts"):
        asyncio.run(chat_agent(url, timeout_s=0.3, retries=1).propose(VIEW, [], 2, 0))


def test_a_provider_that_takes_n_1_only_gets_one_request_per_program(monkeypatch):
    monkeypatch.setenv("BDC_TEST_KEY", "sk-test")
    code = "```python\ndef f(x):\n    return x + 1\n```"
    server = ProviderLike(fail_first=0, max_n=1, content=code)
    with server as url:
        with pytest.raises(BackendError, match="only n=1 is supported"):  # as configured before
            asyncio.run(chat_agent(url).write(VIEW, ["Add one."], 3, 0))
        server.seen.clear()
        agent = chat_agent(url, max_n_per_request=1, supports_seed=False)
        reply = asyncio.run(agent.write(VIEW, ["Add one."], 3, 0))
    assert len(reply.programs) == 3 and reply.programs[0] == "def f(x):\n    return x + 1\n"
    assert [r["body"]["n"] for r in server.seen] == [1, 1, 1]
    assert all("seed" not in r["body"] for r in server.seen)
    # the provider billed three prompts (Usage); the call costs its prompt once (Reply)
    assert agent.usage.calls == 3 and agent.usage.prompt_tokens == 300
    assert reply.tokens == 100 + 3 * 20


def test_one_http_backend_serves_several_event_loops(monkeypatch):
    """explore-compare runs methods and seeds one after another: its agents' client and
    concurrency limit must not stay bound to the first event loop."""
    monkeypatch.setenv("BDC_TEST_KEY", "sk-test")
    with ProviderLike(fail_first=0) as url:
        agent = chat_agent(url)
        for seed in range(3):
            reply = asyncio.run(agent.propose(VIEW, [], 2, seed))
            assert [t.text for t in reply.thoughts] == ["t"]
    assert agent.usage.calls == 3


def test_openai_needs_a_key():
    with pytest.raises(BackendError, match="set the environment variable BDC_NO_SUCH_KEY"):
        OpenAIBackend(HTTPSettings(base_url="https://api.openai.com/v1", model="gpt-4o-mini",
                                   api_key_env="BDC_NO_SUCH_KEY"))


# ----------------------------------------------------------------------------- vLLM

def test_vllm_backend_when_installed(tiny):
    pytest.importorskip("vllm", reason="vLLM is the optional 'gpu' extra")
    from bdc.llm.backends import VLLMBackend

    backend = VLLMBackend(str(tiny), max_model_len=128)
    gens = asyncio.run(backend.generate(Request("### Problem\n", n=2, temperature=0.8,
                                                max_tokens=8, seed=1, logprobs=True)))
    assert len(gens) == 2 and all(g.tokens >= 1 for g in gens)


# ----------------------------------------------------------------------------- completion style

def _gen(text: str, logprob: float | None = -1.0, tokens: int = 4) -> Generation:
    return Generation(text=text, tokens=tokens, logprob=logprob)


def test_the_completion_style_gives_a_base_model_a_docstring_a_plan_and_a_header():
    """A base model (Gemma 3 270M) follows no instruction and writes no JSON: it continues
    a docstring, numbered plan comments and the function's header, and the program is cut
    where the function ends (it keeps writing more functions: measured)."""
    style, s = CompletionStyle("step"), Sampling(thought_tokens=40, program_tokens=80)
    proposal = style.propose(VIEW, ["Take x."], 2, s, 0)
    assert proposal.prompt == '"""Add one.\n\n>>> f(1)\n2\n"""\n# Plan:\n# 1. Take x.\n# 2.'
    assert proposal.stop == ("\n",) and proposal.logprobs and not proposal.chat
    reply = style.parse_proposals([_gen(" Add one to it.", -0.4, 4), _gen("  "),
                                   _gen(" def f(x):")], 2)
    assert [t.text for t in reply.thoughts] == ["Add one to it."]
    assert reply.thoughts[0].prior == pytest.approx(0.9048, abs=1e-4)
    assert style.parse_proposals([_gen("def f(x):")], 2).done  # code, not a plan line
    write = style.write(VIEW, ["Add one."], 1, s, 0)
    assert write.prompt.endswith("# Plan:\n# 1. Add one.\ndef f(")
    program, chain = style.parse_program(
        "x):\n    return x + 1\n\n\ndef g(y):\n    return y\nprint(f(1))", False, VIEW)
    assert program == "def f(x):\n    return x + 1\n" and chain == []
    assert style.parse_program("x):\n", False, VIEW)[0] is None  # no body: no program
    with pytest.raises(ValueError, match="thought: step"):  # not silently a step
        CompletionStyle("plan")


def test_the_completion_style_continues_a_code_prompt_as_gemma_does(humaneval_data):
    """A HumanEval prompt is already the function's head: the model writes the body; the
    program is the prompt (its imports) and the body, without what Gemma wrote after it
    (a real continuation, tests/fixtures/real_samples.jsonl)."""
    from bdc.llm.prompts import parses

    sample = next(json.loads(line) for line in (Path(__file__).parent / "fixtures"
                  / "real_samples.jsonl").read_text().splitlines()
                  if '"gemma-3-270m"' in line and '"HumanEval/0"' in line)
    view = next(p for p in humaneval_data.problems if p.id == "HumanEval/0").public_view()
    style = CompletionStyle("step")
    assert style.propose(view, [], 2, Sampling(), 0).prompt.endswith('"""\n    # Plan:\n    # 1.')
    write = style.write(view, ["Compare every pair."], 1, Sampling(), 0)
    assert write.prompt.startswith("# Plan:\n# 1. Compare every pair.\nfrom typing import List")
    program, _ = style.parse_program(sample["completion"], False, view)
    assert program.startswith("from typing import List") and parses(program)
    assert "is_close_to_threshold" not in program and "return True" in program
    assert style.parse_program("\n\ndef other():\n    pass\n", False, view)[0] is None
