"""The LLM replica: one vLLM ``AsyncLLM`` and vLLM's own OpenAI serving layer on top of it.

A plain class (``serve/app.py`` turns it into a Ray Serve deployment). Requests arrive as vLLM's
own request objects (``ChatCompletionRequest``, ``CompletionRequest``, ``TokenizeRequest`` …),
already authenticated and resolved by the ingress, with a :class:`~serve.protocol.Route` that
says which adapter and which retrieved chunks go with them. The answer is vLLM's: its response
object, its SSE strings or its ``ErrorResponse`` — this class adds only what vLLM lacks (adapters
from the registry by ``name@version``, retrieved context fitted into the window). The same
pattern as Ray Serve LLM's ``VLLMEngine`` (``ray/llm/_internal/serve/engines/vllm``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from cluster.errors import InvalidRequestError, RagtuneError
from serve.config import EngineConfig
from serve.context import context_block, document_block, neutralise_chat, rag_prompt, with_context
from serve.errors import engine_unavailable
from serve.protocol import Prelude, Route
from serve.registry import open_registry
from serve.vllm_args import typed_sections

__all__ = ["AdapterLoadError", "LLMServer", "build_engine", "engine_env", "frontend_args"]

logger = logging.getLogger(__name__)


# Upper bound of the template's tokens around one extra system turn (role markers, newlines).
_TURN_MARKUP_TOKENS = 8
# An engine that dies again within this many seconds of an in-replica restart is not restarted
# in place a second time: the replica exits and Serve starts a fresh process (a clean slate for
# whatever keeps killing it).
_RESTART_COOLDOWN_S = 120.0


class AdapterLoadError(RagtuneError):
    """The registry has the adapter but the engine could not load it (corrupt or incompatible files)."""

    status = 500
    type = "server_error"


def engine_env(cfg: EngineConfig) -> dict[str, str]:
    """Environment the engine needs in its process (vLLM reads these, not arguments)."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if cfg.device == "cpu":
        env |= {
            "VLLM_CPU_KVCACHE_SPACE": f"{cfg.kv_cache_space_gib:g}",
            "VLLM_CPU_OMP_THREADS_BIND": cfg.cpu_threads_bind,
        }
    return env


def _engine_args(cfg: EngineConfig, model_path: str, max_tokens: int | None = None):
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs = cfg.engine_kwargs(model_path)
    if max_tokens is not None:  # the operator cap is also vLLM's default for requests without max_tokens
        override = dict(kwargs.get("override_generation_config") or {})
        kwargs["override_generation_config"] = override | {"max_new_tokens": max_tokens}
    return AsyncEngineArgs(**typed_sections(kwargs))


def frontend_args(cfg: EngineConfig, engine_args) -> argparse.Namespace:
    """The flat namespace vLLM's ``init_app_state`` reads (frontend flags + engine args), as Ray does."""
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    front = FrontendArgs(**cfg.frontend_kwargs())
    return argparse.Namespace(**(vars(front) | vars(engine_args)))


def build_engine(cfg: EngineConfig, model_path: str, max_tokens: int | None = None):
    """Start a vLLM V1 ``AsyncLLM`` for ``model_path`` with LoRA and batching from ``cfg``."""
    from vllm.v1.engine.async_llm import AsyncLLM

    stat_loggers = None
    if cfg.metrics == "ray":  # Ray's metrics pipeline (cluster scrape), as Ray Serve LLM does
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        stat_loggers = [RayPrometheusStatLogger]
    return AsyncLLM.from_engine_args(_engine_args(cfg, model_path, max_tokens), stat_loggers=stat_loggers)


class LLMServer:
    """vLLM's OpenAI serving objects on one engine, plus adapters by registry key and RAG context."""

    def __init__(self, cfg: EngineConfig, model_path: str, store_uri: str, max_tokens: int | None = None):
        self.cfg = cfg
        self._model_path = model_path
        self._max_tokens = max_tokens
        self._registry = open_registry(store_uri, base_model=cfg.base_name, base_model_path=model_path,
                                       max_lora_rank=cfg.max_lora_rank)
        self._engine = None
        self._state = None
        self._restart: asyncio.Task | None = None  # an in-replica engine restart in progress
        self._restarted_at: float | None = None

    async def start(self) -> None:
        """Start the engine and vLLM's serving state (``init_app_state``, exactly as ``vllm serve``).

        The engine is built in a worker thread: ``AsyncLLM.from_engine_args`` blocks while it
        spawns the engine-core process and loads the model (~20 s on CPU), and the event loop must
        keep answering Serve's health checks meanwhile when this runs as a restart. Built outside a
        loop, vLLM starts its output handler lazily at the first request (its supported path).
        """
        from starlette.datastructures import State
        from vllm.entrypoints.openai.api_server import init_app_state

        engine = await asyncio.to_thread(build_engine, self.cfg, self._model_path, self._max_tokens)
        args = frontend_args(self.cfg, _engine_args(self.cfg, self._model_path, self._max_tokens))
        state = State()
        await init_app_state(engine, state, args, supported_tasks=await engine.get_supported_tasks())
        self._engine, self._state = engine, state
        self._models = state.openai_serving_models
        tokenizer = self._engine.renderer.tokenizer
        self._tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._special = sorted({*tokenizer.all_special_tokens, *(t.content for t in added.values() if t.special)},
                               key=len, reverse=True)
        logger.info("LLM replica ready: model=%s max_model_len=%d lora=%s", self.cfg.base_name,
                    self.cfg.max_model_len, self.cfg.enable_lora)

    # ---- adapters ------------------------------------------------------------------------
    async def get_adapter(self, key: str):
        """The engine's ``LoRARequest`` for ``key``; Ray Serve overrides this with a multiplexed LRU."""
        lora = self._models.lora_requests.get(key)
        return lora if lora is not None else await self.load_adapter(key)

    async def load_adapter(self, key: str):
        """Load ``name@version`` from the registry into the engine now (hot-load, no restart).

        The ``LoRARequest`` goes into vLLM's ``OpenAIServingModels`` under the registry key, so
        vLLM's own model check and adapter lookup find it by the name the ingress resolved.
        """
        from vllm.lora.request import LoRARequest

        if not self.cfg.enable_lora:
            raise InvalidRequestError("this server runs with engine.enable_lora=false", param="model")
        ref = self._registry.resolve(key)  # operator view: the ingress already checked the tenant
        lora = LoRARequest(lora_name=ref.key, lora_int_id=ref.lora_id, lora_path=ref.path,
                           base_model_name=self.cfg.base_name)
        try:
            await self._engine.add_lora(lora)
        except Exception as exc:  # engine-side failure: report it, keep serving everything else
            logger.warning("adapter %s failed to load: %s: %s", ref.key, type(exc).__name__, exc)
            # The engine's message names server paths: it stays in the log, not in the response.
            raise AdapterLoadError(f"adapter {ref.key} failed to load (corrupt or incompatible files); "
                                   "the server log has the reason", code="adapter_load_failed") from None
        self._models.lora_requests[ref.key] = lora
        logger.info("adapter %s loaded (lora_id=%d)", ref.key, ref.lora_id)
        return lora

    async def _bind(self, request: Any, route: Route) -> None:
        """Point ``request.model`` at what the ingress resolved (base name or ``name@version``)."""
        if route.adapter is not None:
            lora = await self.get_adapter(route.adapter)
            if route.adapter not in self._models.lora_requests:
                # Serve's multiplexed cache outlived an engine restart: the new engine has not seen it.
                await self._engine.add_lora(lora)
                self._models.lora_requests[route.adapter] = lora
            request.model = route.adapter
        else:
            request.model = self.cfg.base_name

    # ---- generation ----------------------------------------------------------------------
    async def chat(self, request, route: Route) -> AsyncIterator[Any]:
        """``/v1/chat/completions``: a :class:`Prelude` (or an ``ErrorResponse``), then vLLM's answer."""
        serving = self._state.openai_serving_chat
        async for item in self._run(serving, serving.create_chat_completion, request, route, self._fit_chat):
            yield item

    async def completions(self, request, route: Route) -> AsyncIterator[Any]:
        """``/v1/completions``, same stream shape as :meth:`chat`."""
        serving = self._state.openai_serving_completion
        async for item in self._run(serving, serving.create_completion, request, route, self._fit_completion):
            yield item

    async def responses(self, request, route: Route) -> AsyncIterator[Any]:
        """``/v1/responses`` (stateless: vLLM's response store is off), same stream shape as :meth:`chat`."""
        serving = self._state.openai_serving_responses
        async for item in self._run(serving, serving.create_responses, request, route, None):
            # vLLM's router turns Responses events into SSE; over a handle we send the strings.
            yield _sse_event(item) if hasattr(item, "type") and not isinstance(item, Prelude) else item

    async def _run(self, serving, create, request, route: Route, fit) -> AsyncIterator[Any]:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMClientError

        request.request_id = route.request_id
        if self._recovering():
            yield engine_unavailable()
            return
        try:
            await self._bind(request, route)
            if route.context:
                request, used = await fit(request, route.context)
            else:
                used = 0
                if hasattr(request, "messages"):
                    request.messages = neutralise_chat(request.messages, self._special)
            result = await create(request, None)
        except RagtuneError as exc:
            # Yielded, not raised: a client error is an answer, not a replica failure to log.
            yield exc
            return
        except (ValueError, VLLMClientError) as exc:
            yield serving.create_error_response(exc)
            return
        if isinstance(result, ErrorResponse):
            yield result
            return
        yield Prelude(context_used=used)
        if isinstance(result, AsyncIterator):
            async for chunk in result:
                yield chunk
        else:
            yield result


    def _reserve(self, request) -> int:
        """Output tokens kept free when fitting context: what the request asked for, else a share."""
        asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
        return asked or min(self.cfg.context_reserve_tokens, self.cfg.max_model_len // 2)

    async def _fit_chat(self, request, chunks: list[str]):
        """As many retrieved chunks as fit the window, best first.

        The conversation is rendered once by vLLM without the context (a fitted render would be
        refused as too long); the context's own tokens are counted with the same tokenizer.
        """
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        request.messages = neutralise_chat(request.messages, self._special)
        original = list(request.messages)
        rendered = await self._state.openai_serving_chat.render_chat_request(request)
        if isinstance(rendered, ErrorResponse):
            used = len(chunks)  # vLLM reports the real problem when the request runs
        else:
            base_len = len(rendered[1][0]["prompt_token_ids"])
            used = await self._fitting(base_len + _TURN_MARKUP_TOKENS, chunks, self._reserve(request))
        request.messages = with_context(original, chunks[:used], self._special)
        return request, used

    async def _fit_completion(self, request, chunks: list[str]):
        prompt = rag_prompt(request.prompt)
        prompt_len = len(await asyncio.to_thread(self._tokenizer.encode, "\n\n" + prompt))
        used = await self._fitting(prompt_len, chunks, self._reserve(request))
        request.prompt = (context_block(chunks[:used], self._special) + "\n\n" if used else "") + prompt
        return request, used

    async def _fitting(self, fixed: int, chunks: list[str], reserve: int) -> int:
        """How many chunks (best first) fit beside ``fixed`` prompt tokens and ``reserve`` output tokens.

        Every chunk's block (with the blank line that joins it to the next) and the context frame
        are tokenised in **one** batch call, off the event loop (vLLM's tokenizer is a thread-safe
        pool), and the count is a binary search over the running sums. The sum of the parts can
        miss the whole by a few tokens (BPE merges at the joins: 1–7 measured on SmolLM2), so the
        chosen context is tokenised once more to check it — never once per dropped chunk.
        """
        if not chunks:
            return 0
        budget = self.cfg.max_model_len - reserve - fixed
        texts = [document_block(i, text, self._special) + "\n\n" for i, text in enumerate(chunks, 1)]
        texts.append(context_block([], self._special))  # header and <documents> delimiters
        encoded = await asyncio.to_thread(self._tokenizer, texts, add_special_tokens=False)
        *blocks, frame = (len(ids) for ids in encoded["input_ids"])
        used = _fit_count(budget - frame, blocks)
        while used and await self._context_tokens(chunks[:used]) > budget:
            used -= 1  # rare: the check found the estimate a few tokens over
        return used

    async def _context_tokens(self, chunks: list[str]) -> int:
        text = context_block(chunks, self._special)
        return len(await asyncio.to_thread(self._tokenizer.encode, text, add_special_tokens=False))

    # ---- tokenizer endpoints ----------------------------------------------------------------
    async def tokenize(self, request, route: Route):
        """``/tokenize`` (vLLM's ``ServingTokenization``)."""
        if self._recovering():
            raise engine_unavailable()
        await self._bind(request, route)
        return await self._state.serving_tokenization.create_tokenize(request, None)

    async def detokenize(self, request, route: Route):
        """``/detokenize``."""
        if self._recovering():
            raise engine_unavailable()
        await self._bind(request, route)
        return await self._state.serving_tokenization.create_detokenize(request, None)

    # ---- health and metrics ---------------------------------------------------------------
    async def check_health(self) -> None:
        """Ray Serve calls this every ``health_check_period_s``; a dead engine is restarted in place.

        A dead vLLM engine never comes back by itself, and replacing the whole replica costs a
        new actor, its imports and the engine start (measured 34-37 s from the kill to the first
        answer). So on vLLM's ``EngineDeadError`` this replica builds a new engine in place
        (:meth:`_restart_engine`) and keeps passing the check while it does; requests meanwhile
        get a 503 with ``Retry-After``. If the restart fails, or the engine dies again within
        ``_RESTART_COOLDOWN_S`` of one, the process exits: Serve sees the actor crashed at this
        very check and starts a replacement at once (both measured in
        tests/faults/test_serving_faults.py).
        """
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._restarting:
            return
        if self._restart is not None:
            failure = self._restart.exception()
            self._restart = None
            if failure is not None:
                self._exit(f"the in-replica engine restart failed ({type(failure).__name__})")
        try:
            await self.engine_health()
        except EngineDeadError:
            self._begin_restart()

    def _recovering(self) -> bool:
        """True while the engine is being rebuilt (starting one if it just died)."""
        if self._restart is None and self._engine is not None and self._engine.errored:
            self._begin_restart()
        return self._restarting

    @property
    def _restarting(self) -> bool:
        return self._restart is not None and not self._restart.done()

    def _begin_restart(self) -> None:
        if self._restarting:
            return
        if self._restarted_at is not None and time.monotonic() - self._restarted_at < _RESTART_COOLDOWN_S:
            self._exit(f"the engine died again within {_RESTART_COOLDOWN_S:.0f} s of an in-replica restart")
            return
        logger.error("vLLM engine core is dead; restarting the engine inside this replica")
        self._restart = asyncio.get_running_loop().create_task(self._restart_engine())

    async def _restart_engine(self) -> None:
        started = time.monotonic()
        dead, self._engine = self._engine, None
        try:  # reaps what is left of the dead engine's processes and sockets (may wait on them)
            await asyncio.to_thread(dead.shutdown)
        except Exception as exc:  # a half-dead engine may fail to close cleanly; the new one is what matters
            logger.warning("shutting down the dead engine: %s: %s", type(exc).__name__, exc)
        await self.start()
        self._restarted_at = time.monotonic()
        logger.info("engine restarted inside the replica in %.1f s", self._restarted_at - started)

    @staticmethod
    def _exit(reason: str) -> None:
        logger.error("%s; exiting the replica so Serve replaces it now", reason)
        logging.shutdown()
        os._exit(1)

    async def engine_health(self) -> None:
        """Raise if the engine cannot serve (vLLM's ``EngineDeadError`` once its core died).

        What ``/health`` asks: it only reports (a 503 while the engine is dead or restarting);
        ``check_health``, Serve's hook on its own period, does the recovering.
        """
        if self._restarting:
            raise engine_unavailable()
        if self._engine is not None:
            await self._engine.check_health()

    def engine_metrics(self) -> bytes:
        """vLLM's own ``vllm:*`` series of this replica's engine (Prometheus text)."""
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY)

    def __del__(self):
        engine = getattr(self, "_engine", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()


def _fit_count(budget: int, blocks: list[int]) -> int:
    """The largest ``k`` with ``sum(blocks[:k]) <= budget`` (``blocks``: token counts, best first)."""
    return bisect.bisect_right(list(itertools.accumulate(blocks)), budget)


def _sse_event(event: Any) -> str:
    """One Responses API streaming event as SSE, exactly as vLLM's own router writes it."""
    return f"event: {event.type}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
