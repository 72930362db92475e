import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cluster.errors import ConfigError, InvalidRequestError, NotFoundError
from serve.registry import open_registry, parse_model_name


@pytest.fixture
def registry(tmp_path, tiny_model):
    return open_registry(str(tmp_path / "store"), base_model="tiny-llama", base_model_path=str(tiny_model), max_lora_rank=16)


def test_parse_model_name():
    assert parse_model_name("a") == ("a", None)
    assert parse_model_name("a@3") == ("a", 3)
    assert parse_model_name("a@v12") == ("a", 12)
    with pytest.raises(InvalidRequestError, match="must be a number"):
        parse_model_name("a@latest")


def test_register_versions_promote_rollback(registry, adapter_dirs):
    first = registry.register(adapter_dirs["alpha"], "alpha")
    assert (first.version, registry.resolve("alpha").version) == (1, 1)  # first version auto-promoted
    second = registry.register(adapter_dirs["beta"], "alpha")
    assert second.version == 2 and registry.resolve("alpha").version == 1  # not promoted implicitly
    assert second.lora_id != first.lora_id
    registry.promote("alpha", 2)
    assert registry.resolve("alpha").version == 2
    assert registry.resolve("alpha@1").path.endswith("alpha/v1")
    registry.rollback("alpha")
    assert registry.resolve("alpha").version == 1
    with pytest.raises(InvalidRequestError, match="no earlier promoted version"):
        registry.rollback("alpha")
    manifest = registry.manifest(registry.resolve("alpha@2"))
    assert manifest["base_model"] == "tiny-llama" and manifest["version"] == 2


def test_unknown_and_other_tenants_are_404(registry, adapter_dirs):
    registry.register(adapter_dirs["alpha"], "secret", owner="acme")
    registry.register(adapter_dirs["beta"], "shared")
    assert registry.resolve("secret", tenant="acme").owner == "acme"
    for model in ("secret", "secret@1", "nope", "shared@9", "../etc"):
        with pytest.raises(NotFoundError):
            registry.resolve(model, tenant="globex")
    assert [a["name"] for a in registry.list("globex")] == ["shared"]
    assert [a["name"] for a in registry.list(None)] == ["secret", "shared"]
    with pytest.raises(NotFoundError):
        registry.promote("secret", 1, tenant="globex")


def _edit_config(src, dest, **changes):
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg.update(changes)
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 64}, "exceeds the server's max_lora_rank=16"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embeddings/lm_head"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"base_model_name_or_path": "meta-llama/Llama-3-8B"}, "trained on base model"),
    ],
)
def test_validation_rejects_unservable_adapters(registry, adapter_dirs, tmp_path, changes, message):
    bad = _edit_config(adapter_dirs["alpha"], tmp_path / "bad", **changes)
    with pytest.raises(InvalidRequestError, match=message):
        registry.register(bad, "bad")
    assert registry.list() == []  # nothing half-registered


def test_shape_mismatch_is_rejected(registry, tmp_path, tiny_model):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "wrong-base"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 4096)},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(InvalidRequestError, match="fits no projection"):
        registry.register(bad, "wrong")


def test_bad_names_and_schemes(registry, adapter_dirs):
    for name in ("Upper", "a/b", "tiny-llama", "x@1", ""):
        with pytest.raises(InvalidRequestError):
            registry.register(adapter_dirs["alpha"], name)
    with pytest.raises(ConfigError, match="mount the bucket"):
        open_registry("s3://bucket/adapters", base_model="m")


# ---- crash safety -------------------------------------------------------------------------------
# Every filesystem step a registration takes. A forked child registers with a kill switch on these:
# at the k-th call it dies with os._exit (no cleanup, no finally: what SIGKILL leaves), for k = 1, 2, …
# until a registration runs to the end. After each kill the store must reopen consistent and usable.
_STEPS = [(os, "rename"), (os, "replace"), (os, "fsync"), (os, "mkdir"), (os, "rmdir"), (os, "unlink"),
          (shutil, "copytree"), (shutil, "copy2"), (shutil, "rmtree"), (tempfile, "mkdtemp"),
          (tempfile, "mkstemp"), (Path, "write_text")]
_KILLED = 17


def _register_with_kill_switch(root, adapter_dir, tiny_model, kill_at):
    registry = open_registry(str(root), base_model="tiny-llama", base_model_path=str(tiny_model))
    calls = 0

    def killing(fn):
        def step(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == kill_at:
                os._exit(_KILLED)
            return fn(*args, **kwargs)
        return step

    for owner, attr in _STEPS:
        setattr(owner, attr, killing(getattr(owner, attr)))
    registry.register(adapter_dir, "alpha")  # a new version of an existing name
    registry.register(adapter_dir, "fresh", owner="acme")  # a new name
    os._exit(0)


def _check_consistent(root, tiny_model):
    """Reopen (recovery runs) and check: no temp files, folders == index, ids unique, names resolve."""
    registry = open_registry(str(root), base_model="tiny-llama", base_model_path=str(tiny_model))
    assert not [p for p in root.rglob(".tmp-*")], "temp files left behind"
    ids = []
    for adapter in registry.list():
        folders = {p.name for p in (root / adapter["name"]).iterdir() if p.is_dir()}
        assert folders == {f"v{v}" for v in adapter["versions"]}, (adapter, folders)
        for version in adapter["versions"]:
            ref = registry.resolve(f"{adapter['name']}@{version}")
            assert (Path(ref.path) / "adapter_config.json").is_file() and registry.manifest(ref)["version"] == int(version)
            ids.append(ref.lora_id)
        assert registry.resolve(adapter["name"]).version == adapter["promoted"]
    assert len(ids) == len(set(ids)) and int((root / ".lora_ids").read_text()) >= max(ids)
    names = {p.name for p in root.iterdir() if p.is_dir()}
    assert names == {a["name"] for a in registry.list()}  # no name folder without an index
    return registry


def test_a_registration_killed_at_any_step_leaves_a_consistent_usable_store(tmp_path, tiny_model, adapter_dirs):
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    baseline = tmp_path / "baseline"
    first = open_registry(str(baseline), base_model="tiny-llama", base_model_path=str(tiny_model))
    v1 = first.register(adapter_dirs["alpha"], "alpha")
    outcomes = []
    for kill_at in range(1, 200):
        root = tmp_path / f"store-{kill_at}"
        shutil.copytree(baseline, root)
        child = fork.Process(target=_register_with_kill_switch,
                             args=(root, adapter_dirs["beta"], tiny_model, kill_at))
        child.start()
        child.join(60)
        assert child.exitcode in (0, _KILLED), child.exitcode
        registry = _check_consistent(root, tiny_model)
        state = {a["name"]: sorted(map(int, a["versions"])) for a in registry.list()}
        assert state["alpha"] in ([1], [1, 2]) and state.get("fresh") in (None, [1])
        kept = registry.resolve("alpha@1")  # what was committed before is untouched
        assert (kept.lora_id, Path(kept.path).relative_to(root)) == (v1.lora_id, Path("alpha/v1"))
        # The name stays usable: the next registration of both names succeeds and resolves.
        again = registry.register(adapter_dirs["gamma"], "alpha")
        assert again.version == state["alpha"][-1] + 1 and registry.resolve(again.key) == again
        assert registry.register(adapter_dirs["gamma"], "fresh", owner="acme").version == len(state.get("fresh", [])) + 1
        _check_consistent(root, tiny_model)
        outcomes.append(child.exitcode)
        if child.exitcode == 0:
            break
    assert outcomes[-1] == 0 and outcomes.count(_KILLED) >= 20, outcomes  # every step was a kill point


def test_a_failed_step_is_undone_at_once(registry, adapter_dirs, monkeypatch):
    registry.register(adapter_dirs["alpha"], "alpha")

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("serve.registry.os.rename", full_disk)
    with pytest.raises(OSError, match="No space"):
        registry.register(adapter_dirs["beta"], "alpha")
    monkeypatch.undo()
    assert not list(registry.root.rglob(".tmp-*")) and not (registry.root / "alpha" / "v2").exists()
    assert registry.register(adapter_dirs["beta"], "alpha").version == 2


def test_recovery_at_open_removes_leftovers_and_repairs_the_id_counter(registry, adapter_dirs, tiny_model):
    ref = registry.register(adapter_dirs["alpha"], "alpha")
    root = registry.root
    shutil.copytree(adapter_dirs["beta"], root / "alpha" / "v2")  # renamed, index never written
    shutil.copytree(adapter_dirs["beta"], root / ".tmp-abc")  # staged copy
    (root / "alpha" / ".tmp-index").write_text("{")  # half an index write
    (root / "orphan" / "v1").mkdir(parents=True)  # first version of a name, index never written
    (root / ".lora_ids").write_text("0")  # a counter behind the ids in use
    reopened = open_registry(str(root), base_model="tiny-llama", base_model_path=str(tiny_model))
    assert sorted(p.name for p in root.iterdir()) == [".lock", ".lora_ids", "alpha"]
    assert sorted(p.name for p in (root / "alpha").iterdir()) == ["adapter.json", "v1"]
    assert reopened.register(adapter_dirs["beta"], "alpha").lora_id > ref.lora_id
    assert reopened.register(adapter_dirs["beta"], "orphan").version == 1


def test_index_and_id_writes_are_fsynced_and_atomic(registry, adapter_dirs, monkeypatch):
    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr("serve.registry.os.fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr("serve.registry.os.replace",
                        lambda a, b: (replaced.append(Path(b).name), real_replace(a, b))[1])
    registry.register(adapter_dirs["alpha"], "alpha")
    assert replaced == [".lora_ids", "adapter.json"]  # both via temp + os.replace
    assert len(synced) >= 8  # files of the copy, their folders, the temp files and the folders renamed into


def test_cli_recover_reports_what_it_repaired(tmp_path, tiny_model, adapter_dirs, capsys):
    from cluster.cli import main

    store = tmp_path / "store"
    open_registry(str(store), base_model="tiny-llama", base_model_path=str(tiny_model)).register(
        adapter_dirs["alpha"], "alpha")
    shutil.copytree(adapter_dirs["beta"], store / "alpha" / "v2")  # a registration cut before its index write
    args = ["adapters", "recover", "--set", "serve.engine.model=tiny-llama", "--set", f"serve.adapters.store_uri={store}"]
    assert main(args) == 0
    assert "repaired: alpha/v2" in capsys.readouterr().out and not (store / "alpha" / "v2").exists()
    assert main(args) == 0
    assert "adapter store is consistent" in capsys.readouterr().out
