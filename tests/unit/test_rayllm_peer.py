"""Ray Serve LLM as a bench peer: the config it gets from ours, its launcher and its bench rows.

Nothing here starts Ray or an engine: the LLMConfig is checked as data and against the installed
ray.serve.llm's own validation; the bench section runs against fake servers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cluster.rayllm_peer import (
    RayServeLLMServer,
    kill_survivors,
    llm_config,
    peer_env,
    process_tree,
    ray_init_kwargs,
    serving_args,
    survivors,
)
from loadtests.bench import BenchContext, BenchTargets, Peer, stack_vs_raw
from loadtests.fake_server import FakeServer, FakeServerConfig
from serve.config import EngineConfig

MODEL_DIR = "/models/tiny-llama"


def _ours(engine: EngineConfig) -> dict:
    """What our LLM replica hands vLLM, minus what Ray Serve LLM takes from model_loading_config."""
    kwargs = engine.engine_kwargs(MODEL_DIR) | engine.frontend_kwargs()
    return {k: v for k, v in kwargs.items() if k not in ("model", "served_model_name")}


def test_llm_config_is_our_engine_on_cpu_with_zero_cpu_actors():
    engine = EngineConfig(model="tiny-llama", max_model_len=512)
    cfg = llm_config(engine, MODEL_DIR)
    assert cfg["accelerator_config"] == {"kind": "cpu"}  # else it waits forever for a GPU
    assert cfg["deployment_config"] == {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}
    assert cfg["model_loading_config"] == {"model_id": "tiny-llama", "model_source": MODEL_DIR}
    kwargs = cfg["engine_kwargs"]
    assert kwargs == _ours(engine)
    assert {k: kwargs[k] for k in ("dtype", "enforce_eager", "max_model_len", "max_num_seqs", "enable_lora",
                                   "max_loras", "max_lora_rank", "max_cpu_loras", "seed")} == {
        "dtype": "float32", "enforce_eager": True, "max_model_len": 512, "max_num_seqs": 64, "enable_lora": True,
        "max_loras": 8, "max_lora_rank": 16, "max_cpu_loras": 16, "seed": 0}
    assert "model" not in kwargs and "served_model_name" not in kwargs  # Ray Serve LLM refuses them
    env = cfg["runtime_env"]["env_vars"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert cfg["log_engine_metrics"] is False  # our default `metrics: prometheus`

    ingress = serving_args(engine, MODEL_DIR)["ingress_deployment_config"]
    assert ingress == {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}


def test_llm_config_follows_non_default_settings():
    engine = EngineConfig(model="tiny-llama", served_model_name="base", dtype="bfloat16", max_num_seqs=8,
                          enable_lora=False, kv_cache_space_gib=2, cpu_threads_bind="0", metrics="ray",
                          enable_prefix_caching=False)
    cfg = llm_config(engine, MODEL_DIR)
    assert cfg["engine_kwargs"] == _ours(engine)
    assert "enable_lora" not in cfg["engine_kwargs"] and cfg["engine_kwargs"]["enable_prefix_caching"] is False
    assert cfg["model_loading_config"]["model_id"] == "base"
    assert cfg["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert cfg["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert cfg["log_engine_metrics"] is True
    gpu = llm_config(EngineConfig(model="m", device="cuda"), MODEL_DIR)
    assert "accelerator_config" not in gpu and "VLLM_CPU_KVCACHE_SPACE" not in gpu["runtime_env"]["env_vars"]


def test_installed_ray_serve_llm_accepts_the_config_as_cpu():
    """The field names are the installed ray's: validate with its own models (no Ray start)."""
    pytest.importorskip("vllm")
    import ray
    from ray.llm._internal.serve.core.configs.accelerators import CPUConfig
    from ray.llm._internal.serve.core.ingress.builder import LLMServingArgs

    engine = EngineConfig(model="tiny-llama", max_model_len=512)
    (cfg,) = LLMServingArgs.model_validate(serving_args(engine, MODEL_DIR)).llm_configs
    assert isinstance(cfg.accelerator_config, CPUConfig)
    vllm_cfg = cfg.get_engine_config()
    assert vllm_cfg.placement_bundles == [{"CPU": 1}]  # the engine's bundle; the replica adds 0
    assert vllm_cfg.frontend_kwargs == engine.frontend_kwargs()
    init = vllm_cfg.get_initialization_kwargs()
    assert init["distributed_executor_backend"] == "mp" and init["served_model_name"] == ["tiny-llama"]
    assert {k: init[k] for k in vllm_cfg.engine_kwargs} == {k: v for k, v in _ours(engine).items()
                                                           if k not in engine.frontend_kwargs()}
    assert not ray.is_initialized()


def test_ray_on_loopback_with_token_auth_left_on(tmp_path):
    kwargs = ray_init_kwargs(8266, "/tmp/rayllm-x")
    assert kwargs == {"address": "local", "include_dashboard": True, "dashboard_host": "127.0.0.1",
                      "dashboard_port": 8266, "_node_ip_address": "127.0.0.1", "_temp_dir": "/tmp/rayllm-x"}
    env = peer_env({"PATH": "/bin", "RAY_AUTH_TOKEN_PATH": "/x"})
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["HF_HUB_OFFLINE"] == "1"
    assert env["RAY_AUTH_TOKEN_PATH"] == "/x" and "RAY_AUTH_MODE" not in env

    engine = EngineConfig(model="tiny-llama", max_model_len=512)
    server = RayServeLLMServer(engine, MODEL_DIR, tmp_path, port=18001)
    assert server.url == "http://127.0.0.1:18001" and server.model == "tiny-llama"
    cmd = server.command(tmp_path / "e.json", "/tmp/rayllm-x")
    assert cmd[1:3] == ["-m", "cluster.rayllm_peer"]
    assert cmd[cmd.index("--port") + 1] == "18001" and cmd[cmd.index("--model-dir") + 1] == MODEL_DIR
    assert EngineConfig.model_validate_json(json.dumps(engine.model_dump(mode="json"))) == engine


def test_leftover_processes_are_killed_by_pid_and_start_time():
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(tree := process_tree(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(tree) == 3 and tree[0][0] == proc.pid
        stale = [(pid, started + 1) for pid, started in tree]
        assert kill_survivors(stale) == []  # a reused PID (other start time) is left alone
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        children = [p for p in tree if p[0] != proc.pid]
        assert sorted(kill_survivors(children, grace_s=0.3)) == sorted(pid for pid, _ in children)
        assert survivors(children) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def three():
    servers = [FakeServer(FakeServerConfig()).start(), FakeServer(FakeServerConfig(itl_s=0.012)).start(),
               FakeServer(FakeServerConfig(itl_s=0.012)).start()]
    yield servers
    for s in servers:
        s.stop()


def test_section_a_compares_ours_with_each_peer(three, tmp_path):
    ours, raw, rayllm = three
    targets = BenchTargets(ours_url=ours.url, ours_model="base", peer_url=raw.url, peer_model="raw",
                           extra_peers=(Peer("Ray Serve LLM", rayllm.url, "base"),))
    rows = stack_vs_raw(BenchContext(targets=targets, mode="quick", work_dir=tmp_path))
    labels = [r.peer_label for r in rows]
    assert labels == ["raw vLLM"] * 9 + ["Ray Serve LLM"] * 9  # grouped: one table per peer
    by = {(r.peer_label, r.metric): r for r in rows}
    for peer in ("raw vLLM", "Ray Serve LLM"):
        tpot = by[peer, "TPOT p50 @c=4"]
        assert tpot.peer >= 11.5 and tpot.ratio == pytest.approx(tpot.ours / tpot.peer) and tpot.ratio < 1
    assert by["raw vLLM", "TTFT p50 @c=1"].ours == by["Ray Serve LLM", "TTFT p50 @c=1"].ours  # one ours run
    assert raw.stats.by_model["raw"] > 0 and rayllm.stats.by_model["base"] > 0
    assert (tmp_path / "a-ray-serve-llm-c16").is_dir() and (tmp_path / "a-raw-c16").is_dir()


def test_bench_section_a_adds_ray_serve_llm_in_full_mode_only(three, tmp_path, monkeypatch):
    import cluster.rayllm_peer
    from cluster.bench import EXTRA_SECTIONS, RAYLLM_ENV, STACK_VS_PEERS, StackVsPeers
    from loadtests.bench import SERVING_SECTIONS

    assert list({**SERVING_SECTIONS, **EXTRA_SECTIONS})[0] == "a_stack_vs_raw"  # replaced in place
    assert EXTRA_SECTIONS["a_stack_vs_raw"] is STACK_VS_PEERS
    ours, raw, rayllm = three
    started = []

    @contextmanager
    def fake_peer(engine, model_dir, workdir):
        started.append((engine.base_name, model_dir))
        yield type("S", (), {"url": rayllm.url, "model": engine.base_name, "started_in_s": 1.0,
                             "log_path": workdir / "rayllm-peer.log"})()

    monkeypatch.setattr(cluster.rayllm_peer, "RayServeLLMServer", fake_peer)
    monkeypatch.delenv(RAYLLM_ENV, raising=False)
    section = StackVsPeers()
    section.configure(EngineConfig(model="tiny-llama"), Path(MODEL_DIR))
    targets = BenchTargets(ours_url=ours.url, ours_model="tiny-llama", peer_url=raw.url)

    quick = section(BenchContext(targets=targets, mode="quick", work_dir=tmp_path / "q"))
    assert started == [] and {r.peer_label for r in quick} == {"raw vLLM", "Ray Serve LLM"}
    assert quick[-1].ours is None and "skipped in quick mode" in quick[-1].note

    monkeypatch.setenv(RAYLLM_ENV, "1")
    rows = section(BenchContext(targets=targets, mode="quick", work_dir=tmp_path / "f"))
    assert started == [("tiny-llama", Path(MODEL_DIR))]
    assert len([r for r in rows if r.peer_label == "Ray Serve LLM" and r.ratio is not None]) == 9
    assert rayllm.stats.by_model["tiny-llama"] > 0

    def broken(*_a):
        raise TimeoutError("not ready")

    monkeypatch.setattr(cluster.rayllm_peer, "RayServeLLMServer", broken)
    rows = section(BenchContext(targets=targets, mode="quick", work_dir=tmp_path / "b"))
    assert [r.peer_label for r in rows[:-1]] == ["raw vLLM"] * 9  # the raw comparison survives
    assert rows[-1].note == "failed to start: TimeoutError: not ready"
    monkeypatch.setenv(RAYLLM_ENV, "0")
    assert not section.enabled("full")
    monkeypatch.delenv(RAYLLM_ENV)
    assert section.enabled("full") and not section.enabled("quick")
