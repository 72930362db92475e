"""Load-test config: spec parsers, validation messages, loopback rule, CLI → config."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from cluster.errors import ConfigError
from loadtests.cli import add_cli, config_from_args
from loadtests.config import LoadShape, LoadTestConfig, PromptSpec, Slo, parse_levels, parse_mix, parse_slo


def test_parse_mix_normal():
    mix = parse_mix("base=0.5, my-adapter=1.5")
    assert [(m.model, m.weight) for m in mix] == [("base", 0.5), ("my-adapter", 1.5)]


@pytest.mark.parametrize(("spec", "expected"), [
    ("", "empty spec"),
    ("base=1,adapter", "part 2 'adapter' is not NAME=VALUE"),
    ("base=1,=2", "part 2 '=2' is not NAME=VALUE"),
    ("base=x", "part 1 'base=x': 'x' is not a number"),
    ("base=0", "part 1 'base=0': value must be > 0"),
    ("base=-1", "value must be > 0"),
    ("a=1,a=2", "part 2 'a=2': model 'a' appears twice"),
    ("a=nan", "value must be > 0"),
])
def test_parse_mix_errors_name_the_part(spec, expected):
    with pytest.raises(ConfigError, match="--mix") as err:
        parse_mix(spec)
    assert expected in err.value.message


def test_parse_slo():
    assert parse_slo("ttft_ms=500,e2e_ms=2000") == Slo(ttft_ms=500, e2e_ms=2000)


@pytest.mark.parametrize(("spec", "expected"), [
    ("ttft=5", "part 1 'ttft=5': unknown key 'ttft' (known: ttft_ms, tpot_ms, e2e_ms)"),
    ("ttft_ms=5,tpot_ms=fast", "part 2 'tpot_ms=fast': 'fast' is not a number"),
    ("ttft_ms=5,ttft_ms=6", "part 2 'ttft_ms=6': 'ttft_ms' appears twice"),
    ("tpot_ms", "part 1 'tpot_ms' is not NAME=VALUE"),
])
def test_parse_slo_errors_name_the_part(spec, expected):
    with pytest.raises(ConfigError) as err:
        parse_slo(spec)
    assert expected in err.value.message


def test_parse_levels():
    assert parse_levels("1, 4,16") == [1, 4, 16]
    with pytest.raises(ConfigError, match="part 2 'x'"):
        parse_levels("1,x")


def test_config_validation_names_field_and_value():
    with pytest.raises(ValidationError, match=r"shape.levels: a concurrency must be an integer.*2.5"):
        LoadShape(kind="concurrency", levels=[1, 2.5])
    LoadShape(kind="constant", levels=[2.5])  # rates need not be integers
    with pytest.raises(ValidationError, match=r"every level must be > 0, got -1"):
        LoadShape(kind="poisson", levels=[-1])
    with pytest.raises(ValidationError, match="prompts.path is required"):
        PromptSpec(source="jsonl")
    with pytest.raises(ValidationError, match="extra_forbidden"):
        LoadTestConfig(concurrency=4)
    with pytest.raises(ValidationError, match="base_url must look like http://host:port, got 'ftp://x'"):
        LoadTestConfig(base_url="ftp://x")


def test_mix_and_slo_accept_spec_strings():
    cfg = LoadTestConfig(mix="a=1,b=3", slo="ttft_ms=100")
    assert [m.model for m in cfg.mix] == ["a", "b"] and cfg.slo.ttft_ms == 100
    with pytest.raises(ValidationError, match="part 2 'b' is not NAME=VALUE"):
        LoadTestConfig(mix="a=1,b")


def test_non_loopback_needs_explicit_url():
    assert LoadTestConfig(base_url="http://localhost:9000/v1/").base_url == "http://localhost:9000"
    assert LoadTestConfig(base_url="http://[::1]:9000").base_url == "http://[::1]:9000"
    with pytest.raises(ValidationError, match="not a loopback address; pass it explicitly"):
        LoadTestConfig(base_url="http://10.1.2.3:8000")
    assert LoadTestConfig(base_url="http://10.1.2.3:8000", allow_remote=True).endpoint() == (
        "http://10.1.2.3:8000/v1/chat/completions")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragtune")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_builds_config_and_reads_key_from_env():
    args = _parser().parse_args(["loadtest", "--url", "http://10.0.0.5:8000", "--mix", "a=1,b=1",
                                 "--shape", "poisson", "--levels", "0.5,2", "--requests", "0",
                                 "--slo", "ttft_ms=300", "--rag-fraction", "0.25", "--no-output-control"])
    cfg = config_from_args(args, env={"RAGTUNE_API_KEY": "k-123"})
    assert cfg.allow_remote and cfg.base_url == "http://10.0.0.5:8000"
    assert cfg.shape.kind == "poisson" and cfg.shape.levels == [0.5, 2] and cfg.shape.requests is None
    assert cfg.slo == Slo(ttft_ms=300) and cfg.rag.fraction == 0.25
    assert cfg.api_key.get_secret_value() == "k-123" and not cfg.prompts.control_output_length


def test_cli_yaml_config_then_overrides(tmp_path):
    path = tmp_path / "lt.yaml"
    path.write_text("mix: a=1\nshape: {kind: constant, levels: [3], duration_s: 5}\nseed: 7\n")
    args = _parser().parse_args(["loadtest", "--config", str(path), "--duration", "2"])
    cfg = config_from_args(args, env={})
    assert cfg.shape.levels == [3] and cfg.shape.duration_s == 2 and cfg.seed == 7
    assert cfg.mix[0].model == "a" and cfg.api_key is None


@pytest.mark.parametrize(("argv", "expected"), [
    (["--mix", "a=1,b"], "argument --mix: --mix: part 2 'b' is not NAME=VALUE"),
    (["--slo", "ttft_ms=1,p99=2"], "argument --slo: --slo: part 2 'p99=2': unknown key 'p99'"),
    (["--levels", "1,,4"], "argument --levels: --levels: part 2 ''"),
])
def test_cli_bad_specs_are_usage_errors(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["loadtest", *argv])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err
