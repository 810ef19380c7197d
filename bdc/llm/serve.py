"""``bdc serve``: a local model behind the OpenAI HTTP protocol (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``), batching concurrent requests like the in-process
backend. It lets the HTTP agent path run end to end without a provider or vLLM (which serves
the same protocol on GPU machines).

A model server runs whatever prompts reach it on its machine's accelerator, and vLLM's also
loads LoRA adapters from any path it is sent: on an address others can reach it takes an API
key (both engines), which clients send as OpenAI's do (``Authorization: Bearer <key>``; the
agents read theirs through ``api_key_env``). The key comes from an environment variable only,
so it never lands in a command line, params.yaml, a log or MLflow.
"""

from __future__ import annotations

import hmac
import os
import time
import uuid

from bdc.errors import BDCError
from bdc.llm.backends import HFBackend
from bdc.llm.base import BackendError, Request
from bdc.processes import is_loopback

KEY_ENV = "BDC_SERVE_API_KEY"  # where `bdc serve` reads its key unless told another variable


def server_key(env: str | None) -> str | None:
    """The API key in environment variable ``env`` (None: unset or empty)."""
    return (os.environ.get(env) or None) if env else None


def check_exposure(host: str, key: str | None, allow_open: bool, env: str) -> str | None:
    """Refuse to serve on an address others can reach without a key; with ``allow_open``,
    serve anyway and return the warning to show."""
    if key or is_loopback(host):
        return None
    if not allow_open:
        raise BDCError(f"--host {host}: anyone who can reach this address could use the model "
                       f"server, and it has no API key. Set {env} (clients send it as "
                       "'Authorization: Bearer <key>'; agents read it through api_key_env), "
                       "bind to 127.0.0.1, or pass --allow-open to serve without a key anyway")
    return (f"WARNING: serving on {host} WITHOUT an API key (--allow-open): anyone who can "
            "reach this address can use the model server")


def authorized(header: str | None, key: str) -> bool:
    """``header`` (the request's Authorization) carries ``key`` as a bearer token (compared
    in constant time)."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              key.encode())


def _error(message: str, status: int, param: str | None = None, code: str | None = None):
    """An error the way OpenAI's API sends one (its clients raise ``BadRequestError`` on a
    400 with this message, ``AuthenticationError`` on a 401)."""
    from starlette.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status)


def _request(body: dict, chat: bool) -> Request:
    if chat:
        prompt = tuple((m["role"], m["content"]) for m in body["messages"])
        logprobs = bool(body.get("logprobs"))
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list):  # the protocol allows a list; we serve one prompt
            if len(prompt) != 1:
                raise ValueError("send one prompt per request")
            prompt = prompt[0]
        logprobs = body.get("logprobs") is not None
    stop = body.get("stop") or ()
    return Request(prompt=prompt, n=int(body.get("n", 1)),
                   temperature=float(body.get("temperature", 1.0)),
                   max_tokens=int(body.get("max_tokens", 256)),
                   stop=(stop,) if isinstance(stop, str) else tuple(stop),
                   seed=int(body.get("seed") or 0), logprobs=logprobs)


def create_app(backend: HFBackend, model_name: str, key: str | None = None):
    """The OpenAI routes over ``backend``; with ``key``, every route answers 401 (before
    reading the request, so nothing is generated) unless the request carries it."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def guarded(handler):
        async def route(request):
            if key and not authorized(request.headers.get("authorization"), key):
                return _error("invalid or missing API key: send 'Authorization: Bearer "
                              "<key>'", 401, code="invalid_api_key")
            return await handler(request)
        return route

    async def models(_request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model"}]})

    async def complete(http_request, chat: bool) -> JSONResponse:
        try:
            body = await http_request.json()
            request = _request(body, chat)
        except (ValueError, KeyError, TypeError) as exc:
            return _error(f"bad request: {exc}", 400)
        if body.get("model") and body["model"] != model_name:  # as vLLM's server answers
            return _error(f"The model `{body['model']}` does not exist.", 404, "model",
                          "model_not_found")
        if body.get("stream"):
            return _error("bdc serve does not stream: send the request with stream false "
                          "(vLLM's server streams: bdc serve --engine vllm)", 400, "stream")
        if chat and not getattr(backend.tokenizer, "chat_template", None):
            # checked here, not in the batch: it would fail the other requests batched with it
            return _error(f"{model_name} has no chat template, so it cannot answer chat "
                          "requests: send a prompt to /v1/completions", 400, "messages")
        try:
            done = await backend.generate(request)
        except BackendError as exc:  # the request asks what this model cannot do
            return _error(str(exc), 400, "messages" if chat else "prompt")
        gens = done.generations
        choices = []
        for i, g in enumerate(gens):
            finish = "stop" if any(g.text.endswith(s) for s in request.stop) or \
                g.tokens < request.max_tokens else "length"
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": g.text},
                          "finish_reason": finish}
                if request.logprobs:
                    choice["logprobs"] = {"content": [{"logprob": lp}
                                                      for lp in g.token_logprobs or []]}
            else:
                choice = {"index": i, "text": g.text, "finish_reason": finish,
                          "logprobs": {"token_logprobs": g.token_logprobs}
                          if request.logprobs else None}
            choices.append(choice)
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()),
            "object": "chat.completion" if chat else "text_completion", "model": model_name,
            "choices": choices,
            "usage": {"prompt_tokens": done.prompt_tokens,
                      "completion_tokens": done.completion_tokens,
                      "total_tokens": done.tokens}})

    async def completions(request) -> JSONResponse:
        return await complete(request, chat=False)

    async def chat_completions(request) -> JSONResponse:
        return await complete(request, chat=True)

    return Starlette(routes=[
        Route("/v1/models", guarded(models)),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"])])


def serve(model: str, host: str, port: int, batch_size: int, name: str | None = None,
          key: str | None = None) -> None:
    import uvicorn

    backend = HFBackend(model, batch_size)
    uvicorn.run(create_app(backend, name or model, key), host=host, port=port,
                log_level="warning")
