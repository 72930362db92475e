"""The grouped, masked CPU LoRA ops (serve/vllm_patches.py) against a per-row reference and vLLM's own.

Pure torch: vLLM's torch op module is imported (and a pristine copy of it loaded from its file, so
the upstream behaviour is tested even after ``register()`` patched the live module), but no engine.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from serve import vllm_patches as vp

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")
UPSTREAM_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
# (rtol, atol) against the exact float64 product. fp32: accumulation error of a few hundred terms;
# bf16: about one unit in the last place of values of magnitude ~1 (2**-7 = 7.8e-3), plus one more
# rounding when the product is added to an existing bf16 output.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2)}
MIXES = ("all_base", "one_adapter", "interleaved", "blocks", "random", "random_with_base")


@pytest.fixture(scope="module")
def upstream():
    """vLLM 0.32's ops exactly as shipped: a fresh module from the installed file (never patched)."""
    origin = importlib.util.find_spec(UPSTREAM_MODULE).origin
    spec = importlib.util.spec_from_file_location("_pristine_vllm_lora_ops", origin)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_vllm_modules():
    """Undo register()'s rebinding after a test, so no other test sees patched vLLM modules."""
    saved = {}
    for name in vp.PATCHED_MODULES:
        module = importlib.import_module(name)
        saved[name] = {attr: module.__dict__[attr] for attr in (*OPS, vp._PATCHED_ATTR) if attr in module.__dict__}
    yield
    for name, attrs in saved.items():
        module = sys.modules[name]
        for attr in (*OPS, vp._PATCHED_ATTR):
            if attr in attrs:
                setattr(module, attr, attrs[attr])
            elif hasattr(module, attr):
                delattr(module, attr)


# --- helpers ----------------------------------------------------------------------------------------


def _indices(mix: str, n: int, slots: int, gen: torch.Generator) -> torch.Tensor:
    if mix == "all_base":
        return torch.full((n,), -1, dtype=torch.long)
    if mix == "one_adapter":
        return torch.full((n,), int(torch.randint(slots, (1,), generator=gen)), dtype=torch.long)
    if mix == "interleaved":  # decode-like: request i uses slot i % (slots+1) - 1, base rows included
        return torch.arange(n) % (slots + 1) - 1
    if mix == "blocks":  # prefill-like: contiguous segments, a slot (or base) each, slots may repeat
        cuts = sorted(torch.randint(1, max(n, 2), (4,), generator=gen).tolist())
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
        segment_slots = torch.randint(-1, slots, (len(lengths),), generator=gen)
        return torch.repeat_interleave(segment_slots, torch.tensor(lengths))
    if mix == "random":
        return torch.randint(0, slots, (n,), generator=gen)
    if mix == "random_with_base":
        return torch.randint(-1, slots, (n,), generator=gen)
    raise AssertionError(mix)


def _segments(indices: torch.Tensor) -> tuple:
    """The sgmv metadata vLLM's compute_meta builds: runs of equal consecutive indices."""
    slots, lengths = torch.unique_consecutive(indices, return_counts=True)
    starts = torch.zeros_like(lengths)
    starts[1:] = torch.cumsum(lengths, 0)[:-1]
    return starts, lengths, slots, slots.numel(), int(lengths.max()), int(lengths.sum())


def _per_row(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The straightforward definition, in float64: row i is ``inputs[i] @ W[idx[i]].T``, 0 if idx < 0.

    Operands are first cast to the op's compute dtype (the output's), as vLLM's ops do.
    """
    w = weights.squeeze(dim=1) if weights.dim() == 4 else weights
    x, w = inputs.to(dtype).double(), w.to(dtype).double()
    out = torch.zeros(inputs.shape[0], w.shape[1], dtype=torch.float64)
    for i, slot in enumerate(indices.tolist()):
        if slot >= 0:
            out[i] = x[i] @ w[slot].T
    return out


def _stacked(slots: int, rows: int, cols: int, dtype, four_d: bool, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(slots, rows, cols, generator=gen) / cols**0.5  # products of magnitude ~1
    return (w.unsqueeze(1) if four_d else w).to(dtype)


def _assert_close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


def _case(dtype, mix, seed):
    gen = torch.Generator().manual_seed(seed * 7919 + MIXES.index(mix) * 31 + (dtype == torch.bfloat16))
    n = [1, 2, 16, 300][seed] if seed < 4 else int(torch.randint(1, 301, (1,), generator=gen))
    case = {
        "n": n,
        "slots": int(torch.randint(1, 9, (1,), generator=gen)),
        "rank": [1, 8, 16, 64][int(torch.randint(4, (1,), generator=gen))],
        "hidden": [64, 576][int(torch.randint(2, (1,), generator=gen))],
        "out": [96, 1536][int(torch.randint(2, (1,), generator=gen))],
        "four_d": bool(torch.randint(2, (1,), generator=gen)),
        "gen": gen,
    }
    case["idx"] = _indices(mix, n, case["slots"], gen)
    return case


CASES = [(dtype, mix, seed) for dtype in (torch.float32, torch.bfloat16) for mix in MIXES for seed in range(6)]
CASE_IDS = [f"{str(d).removeprefix('torch.')}-{m}-{s}" for d, m, s in CASES]


def _call(op: str, idx: torch.Tensor, *args, **kwargs):
    """Call the patched op in its bgmv (per-token index) or sgmv (segment metadata) form."""
    fn = getattr(vp, op)
    if op.startswith("sgmv"):
        head, tail = args[:3], args[3:]
        return fn(*head, *_segments(idx), *tail, **kwargs)
    return fn(*args[:3], idx, *args[3:], **kwargs)


# --- the grouped ops equal the per-row reference ------------------------------------------------------


@pytest.mark.parametrize("form", ["bgmv", "sgmv"])
@pytest.mark.parametrize(("dtype", "mix", "seed"), CASES, ids=CASE_IDS)
def test_shrink_matches_per_row_reference(form, dtype, mix, seed):
    c = _case(dtype, mix, seed)
    gen, idx = c["gen"], c["idx"]
    x = torch.randn(c["n"], c["hidden"], generator=gen).to(dtype)
    a = _stacked(c["slots"], c["rank"], c["hidden"], dtype, c["four_d"], gen)
    scaling = [1.0, 0.5, 2.0][seed % 3]
    # vLLM shrinks into a float32 buffer; the same op with a model-dtype buffer, and a buffer wider
    # than the rank (columns past the rank must be left alone), are checked too.
    for out_dtype, extra_cols in ((torch.float32, 0), (dtype, 0), (torch.float32, 5)):
        initial = torch.randn(c["n"], c["rank"] + extra_cols, generator=gen).to(out_dtype)
        y = initial.clone()
        _call(f"{form}_shrink", idx, x, a, y, scaling)
        expected = scaling * _per_row(x, a, idx, out_dtype)
        _assert_close(y[:, : c["rank"]], expected, out_dtype)
        assert torch.equal(y[:, c["rank"] :], initial[:, c["rank"] :])
        assert torch.count_nonzero(y[idx < 0, : c["rank"]]) == 0  # base rows: exactly no contribution


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("form", ["bgmv", "sgmv"])
@pytest.mark.parametrize(("dtype", "mix", "seed"), CASES, ids=CASE_IDS)
def test_expand_matches_per_row_reference(form, add_inputs, dtype, mix, seed):
    c = _case(dtype, mix, seed)
    gen, idx = c["gen"], c["idx"]
    buffer = torch.randn(c["n"], c["rank"], generator=gen)  # float32, as vLLM's shrink buffer
    b = _stacked(c["slots"], c["out"], c["rank"], dtype, c["four_d"], gen)
    base = idx < 0
    # The model's output may be padded wider than the adapter's, or the adapter's wider than the
    # model's: only the common_len = min(...) leading columns are written.
    full_product = _per_row(buffer, b, idx, dtype)
    for width in (c["out"], c["out"] + 7, c["out"] - 5):
        common = min(width, c["out"])
        initial = torch.randn(c["n"], width, generator=gen).to(dtype)
        y = initial.clone()
        _call(f"{form}_expand", idx, buffer, b, y, add_inputs=add_inputs)
        product = full_product[:, :common]
        expected = initial[:, :common].double() + product if add_inputs else product
        _assert_close(y[:, :common], expected, dtype)
        assert torch.equal(y[:, common:], initial[:, common:])
        if add_inputs:
            assert torch.equal(y[base], initial[base])  # base rows bit-for-bit untouched
        else:
            assert torch.count_nonzero(y[base, :common]) == 0


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("form", ["bgmv", "sgmv"])
@pytest.mark.parametrize(("dtype", "mix", "seed"), CASES, ids=CASE_IDS)
def test_expand_slice_matches_per_row_reference(form, add_inputs, dtype, mix, seed):
    c = _case(dtype, mix, seed)
    gen, idx = c["gen"], c["idx"]
    size = c["out"]
    buffer = torch.randn(c["n"], c["rank"], generator=gen)
    b = _stacked(c["slots"], size, c["rank"], dtype, c["four_d"], gen)
    base = idx < 0
    # e.g. the v slice of a merged qkv output: [q | k | v], offset = q + k
    offset = 3 * seed + 1
    initial = torch.randn(c["n"], offset + size + 11, generator=gen).to(dtype)
    y = initial.clone()
    _call(f"{form}_expand_slice", idx, buffer, b, y, offset, size, add_inputs=add_inputs)
    product = _per_row(buffer, b, idx, dtype)
    window = y[:, offset : offset + size]
    expected = initial[:, offset : offset + size].double() + product if add_inputs else product
    _assert_close(window, expected, dtype)
    assert torch.equal(y[:, :offset], initial[:, :offset])
    assert torch.equal(y[:, offset + size :], initial[:, offset + size :])
    if add_inputs:
        assert torch.equal(y[base], initial[base])
    else:
        assert torch.count_nonzero(window[base]) == 0


@pytest.mark.parametrize("idx", [[-1, 0, 0, 2, -1, 1], [0, 1, 0, 1, -1, -1]], ids=["runs", "interleaved"])
def test_assigning_ops_overwrite_garbage(idx):
    """shrink and expand(add_inputs=False) assign: NaN left in a reused buffer must not survive, on
    the contiguous-run path (addmm_ with beta=0) or the packed path (index_copy_), base rows included."""
    idx = torch.tensor(idx)
    y = torch.full((6, 4), float("nan"))
    vp.bgmv_shrink(torch.randn(6, 32), torch.randn(3, 1, 4, 32), y, idx, 1.0)
    assert not torch.isnan(y).any() and torch.count_nonzero(y[idx < 0]) == 0
    out = torch.full((6, 8), float("nan"))
    vp.sgmv_expand(torch.randn(6, 4), torch.randn(3, 1, 8, 4), out, *_segments(idx), add_inputs=False)
    assert not torch.isnan(out).any() and torch.count_nonzero(out[idx < 0]) == 0


# --- both execution paths (one bmm for small batches, a loop of matmuls otherwise) ---------------------


def test_plans_take_the_intended_path():
    """Decode (16 rows, 8 adapters interleaved) → one bmm; prefill (16 × 256 tokens) → one in-place
    matmul per segment; short runs of an adapter seen several times → one packed matmul per adapter."""
    cpu = torch.device("cpu")
    decode = vp._plan(list(range(8)) * 2, [1] * 16, cpu)
    assert decode.batched is not None
    prefill = vp._plan(list(range(8)) * 2, [256] * 16, cpu)
    assert prefill.batched is None and prefill.packed_rows is None
    runs = sorted(prefill.runs, key=lambda run: run[1].start)
    assert runs == [(slot, slice(256 * k, 256 * (k + 1))) for k, slot in enumerate(list(range(8)) * 2)]
    # chunked prefill beside decode tokens: the 100-token chunk in place, the decode tokens in one bmm
    mixed = vp._plan([0, 1, 0, 1, 2, 1], [1, 1, 1, 1, 100, 1], cpu)
    assert mixed.runs == [(2, slice(4, 104))] and mixed.packed_rows is None
    lo, hi, gather, keep, rows = mixed.batched
    assert (lo, hi, rows.tolist()) == (0, 1, [0, 2, 1, 3, 104])
    # ... and packed, one matmul per adapter, when they are too many for the bmm
    many = vp._plan([0, 1] * 80 + [2], [1] * 160 + [100], cpu)
    assert many.batched is None and many.runs == [(2, slice(160, 260))]
    assert [slot for slot, _, _ in many.packed] == [0, 1] and len(many.packed_rows) == 160
    sorted_prefill = vp._plan([-1, *range(8)], [256] * 9, torch.device("cpu"))
    assert sorted_prefill.packed_rows is None and len(sorted_prefill.runs) == 8
    assert sorted_prefill.negatives == [slice(0, 256)]
    skewed = vp._plan([0, 7], [9, 1], torch.device("cpu"))  # bmm would pad 8 slots to 9 rows: loop
    assert skewed.batched is None


@pytest.mark.parametrize("path", ["loop", "batched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", ["interleaved", "random_with_base", "blocks"])
def test_both_paths_match_per_row_reference(monkeypatch, path, dtype, mix):
    monkeypatch.setattr(vp, "_PLAN_CACHE", type(vp._PLAN_CACHE)())
    monkeypatch.setattr(vp, "_BATCHED_MAX_ROWS", 0 if path == "loop" else 10**6)
    gen = torch.Generator().manual_seed(11)
    took_bmm = []
    for n, slots in ((16, 8), (40, 3), (5, 5)):
        idx = _indices(mix, n, slots, gen)
        took_bmm.append(vp._token_plan(idx, torch.empty(0)).batched is not None)
        x = torch.randn(n, 64, generator=gen).to(dtype)
        a = _stacked(slots, 8, 64, dtype, True, gen)
        b = _stacked(slots, 48, 8, dtype, False, gen)
        buffer = torch.full((n, 8), float("nan"))
        vp.sgmv_shrink(x, a, buffer, *_segments(idx), 0.5)
        _assert_close(buffer, 0.5 * _per_row(x, a, idx, torch.float32), torch.float32)
        initial = torch.randn(n, 60, generator=gen).to(dtype)
        for add in (True, False):
            y = initial.clone()
            vp.bgmv_expand_slice(buffer, b, y, idx, 6, 48, add_inputs=add)
            product = _per_row(buffer, b, idx, dtype)
            _assert_close(y[:, 6:54], product + (initial[:, 6:54].double() if add else 0), dtype)
            assert torch.equal(y[:, :6], initial[:, :6]) and torch.equal(y[:, 54:], initial[:, 54:])
            if add:
                assert torch.equal(y[idx < 0], initial[idx < 0])
    assert any(took_bmm) == (path == "batched"), took_bmm


@pytest.mark.parametrize("path", ["loop", "batched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_mixing_decode_tokens_and_a_prefill_matches_per_row_reference(monkeypatch, path, dtype):
    """15 decode tokens of 5 adapters and base, interleaved, beside a 40-token prefill and a base prompt."""
    monkeypatch.setattr(vp, "_PLAN_CACHE", type(vp._PLAN_CACHE)())
    monkeypatch.setattr(vp, "_BATCHED_MAX_ROWS", 0 if path == "loop" else 128)
    gen = torch.Generator().manual_seed(5)
    decode = [0, 1, -1, 2, 3, 4, 0, 1, -1, 2, 3, 4, 0, 1, 2]
    idx = torch.tensor(decode[:7] + [3] * 40 + decode[7:] + [-1] * 20)
    plan = vp._token_plan(idx, torch.empty(0))
    assert plan.runs[0] == (3, slice(7, 47)) and (plan.batched is not None) == (path == "batched")
    n = len(idx)
    x = torch.randn(n, 64, generator=gen).to(dtype)
    a = _stacked(5, 8, 64, dtype, True, gen)
    b = _stacked(5, 48, 8, dtype, False, gen)
    buffer = torch.full((n, 8), float("nan"))
    vp.sgmv_shrink(x, a, buffer, *_segments(idx), 0.5)
    _assert_close(buffer, 0.5 * _per_row(x, a, idx, torch.float32), torch.float32)
    initial = torch.randn(n, 48, generator=gen).to(dtype)
    for add in (True, False):
        y = initial.clone()
        vp.sgmv_expand(buffer, b, y, *_segments(idx), add_inputs=add)
        _assert_close(y, _per_row(buffer, b, idx, dtype) + (initial.double() if add else 0), dtype)
        if add:
            assert torch.equal(y[idx < 0], initial[idx < 0])


# --- same results as vLLM where vLLM is right (every slot >= 0), including its odd row-count cases ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_as_upstream_without_base_rows(upstream, dtype):
    gen = torch.Generator().manual_seed(5)
    for n, idx in ((16, torch.arange(16) % 5), (40, torch.tensor([3] * 20 + [0] * 12 + [3] * 8)), (1, torch.tensor([4]))):
        x = torch.randn(n, 64, generator=gen).to(dtype)
        a = _stacked(5, 8, 64, dtype, True, gen)
        b = _stacked(5, 48, 8, dtype, True, gen)
        buf = torch.randn(n, 8, generator=gen)
        y = torch.randn(n, 100, generator=gen).to(dtype)
        seg = _segments(idx)
        pairs = [
            ("bgmv_shrink", (x, a, torch.zeros(n, 8), idx, 0.5), {}),
            ("sgmv_shrink", (x, a, torch.zeros(n, 8), *seg, 0.5), {}),
            ("bgmv_expand", (buf, b, y.clone(), idx), {"add_inputs": True}),
            ("sgmv_expand", (buf, b, y.clone(), *seg), {"add_inputs": False}),
            ("bgmv_expand_slice", (buf, b, y.clone(), idx, 30, 48), {"add_inputs": True}),
            ("sgmv_expand_slice", (buf, b, y.clone(), *seg, 30, 48), {"add_inputs": True}),
        ]
        for op, args, kwargs in pairs:
            ours = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
            getattr(upstream, op)(*args, **kwargs)
            getattr(vp, op)(*ours, **kwargs)
            torch.testing.assert_close(ours[2], args[2], rtol=TOL[dtype][0], atol=TOL[dtype][1], msg=op)


def test_upstream_row_count_special_cases(upstream):
    """bgmv_expand's ``outputs.shape[0] == 1`` broadcast, truncation to the output's rows, and one index
    broadcast over all input rows take the fallback path and still match vLLM exactly in meaning."""
    gen = torch.Generator().manual_seed(9)
    b = torch.randn(3, 1, 24, 4, generator=gen)
    cases = [
        (torch.randn(1, 4, generator=gen), torch.randn(5, 24, generator=gen), torch.tensor([2])),  # 1 row → all
        (torch.randn(6, 4, generator=gen), torch.randn(4, 24, generator=gen), torch.tensor([0, 1, 2, 1, 0, 2])),
        (torch.randn(5, 4, generator=gen), torch.randn(5, 24, generator=gen), torch.tensor([1])),  # 1 index
    ]
    for inputs, out, idx in cases:
        for add in (True, False):
            theirs, ours = out.clone(), out.clone()
            upstream.bgmv_expand(inputs, b, theirs, idx, add_inputs=add)
            vp.bgmv_expand(inputs, b, ours, idx, add_inputs=add)
            torch.testing.assert_close(ours, theirs)
    # ... and in the broadcast case a base index still contributes nothing.
    out = torch.randn(5, 24, generator=gen)
    ours = out.clone()
    vp.bgmv_expand(torch.randn(1, 4, generator=gen), b, ours, torch.tensor([-1]), add_inputs=True)
    assert torch.equal(ours, out)


# --- the bug the patch fixes -------------------------------------------------------------------------


@pytest.mark.parametrize("slots", [2, 3, 8])
def test_upstream_applies_the_last_slot_to_base_rows(upstream, slots):
    """vLLM's original op computes a -1 (no LoRA) row with ``weights[-1]``, the last slot's adapter."""
    gen = torch.Generator().manual_seed(slots)
    x = torch.randn(3, 32, generator=gen)
    a = torch.randn(slots, 1, 4, 32, generator=gen)
    idx = torch.tensor([0, -1, slots - 1])

    buffer = torch.zeros(3, 4)
    upstream.bgmv_shrink(x, a, buffer, idx, 1.0)
    assert torch.count_nonzero(buffer[1]) > 0  # the base row got a LoRA product ...
    torch.testing.assert_close(buffer[1], x[1] @ a[-1, 0].T)  # ... the last slot's
    fixed = torch.zeros(3, 4)
    vp.bgmv_shrink(x, a, fixed, idx, 1.0)
    assert torch.count_nonzero(fixed[1]) == 0

    b = torch.randn(slots, 1, 16, 4, generator=gen)
    y = torch.zeros(3, 16)
    upstream.sgmv_expand(buffer, b, y, *_segments(idx), add_inputs=True)
    assert torch.count_nonzero(y[1]) > 0
    y = torch.zeros(3, 16)
    vp.sgmv_expand(buffer, b, y, *_segments(idx), add_inputs=True)
    assert torch.count_nonzero(y[1]) == 0


# --- the punica CPU wrapper, end to end, on the patched ops --------------------------------------------


@pytest.mark.usefixtures("restore_vllm_modules")
def _qkv_case(gen: torch.Generator):
    """A merged q/k/v layer through a real PunicaWrapperCPU, 3 slots, metadata from a LoRAMapping."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    lora_ids, per_request, tokens = [11, 12, 13], [12, 0, 11, 13, 0, 12, 12], [5, 3, 1, 1, 4, 1, 2]
    index_mapping = [rid for rid, t in zip(per_request, tokens, strict=True) for _ in range(t)]
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=16, device="cpu")
    wrapper.update_metadata(LoRAMapping(index_mapping, per_request, is_prefill=True), [*lora_ids, None], 4, 1000)
    slot_of = {0: -1, **{rid: k for k, rid in enumerate(lora_ids)}}
    idx = torch.tensor([slot_of[r] for r in index_mapping])
    n, hidden, rank, slices = len(index_mapping), 64, 8, (64, 32, 32)
    x = torch.randn(n, hidden, generator=gen)
    a = tuple(torch.randn(4, 1, rank, hidden, generator=gen) / 8 for _ in slices)
    b = tuple(torch.randn(4, 1, size, rank, generator=gen) / 3 for size in slices)
    return wrapper, idx, x, a, b, slices


class _Layer:
    """What ``mark_live_slots`` reads off a vLLM LoRA layer: its stacked A and B tensors."""

    def __init__(self, a, b):
        self.lora_a_stacked, self.lora_b_stacked = a, b


def _qkv_expected(y0, x, a, b, idx, slices) -> torch.Tensor:
    """``y0`` plus every slice's per-row LoRA product, in float64."""
    expected, offset = y0.double().clone(), 0
    for k, size in enumerate(slices):
        shrunk = _per_row(x, a[k], idx, torch.float32)
        expected[:, offset : offset + size] += _per_row(shrunk.float(), b[k], idx, torch.float32)
        offset += size
    return expected


def test_punica_cpu_wrapper_uses_patched_ops():
    """add_lora_linear on a merged q/k/v layer through vLLM's PunicaWrapperCPU, metadata from a real
    LoRAMapping (V1 marks every step is_prefill → the sgmv path), equals the per-row reference."""
    vp.register()
    gen = torch.Generator().manual_seed(3)
    wrapper, idx, x, a, b, slices = _qkv_case(gen)
    y0 = torch.randn(idx.numel(), sum(slices), generator=gen)
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, 1.0, slices)
    torch.testing.assert_close(y.double(), _qkv_expected(y0, x, a, b, idx, slices), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[idx < 0], y0[idx < 0])


def _wrapper(slot_per_request: list[int], tokens: list[int], slots: int):
    """A real PunicaWrapperCPU whose step has request ``i`` on slot ``slot_per_request[i]`` (-1: base)
    with ``tokens[i]`` tokens; returns it and the per-token slot index."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    lora_ids = list(range(101, 101 + slots))
    per_request = [lora_ids[s] if s >= 0 else 0 for s in slot_per_request]
    index_mapping = [rid for rid, t in zip(per_request, tokens, strict=True) for _ in range(t)]
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=len(index_mapping), max_batches=len(tokens), device="cpu")
    wrapper.update_metadata(LoRAMapping(index_mapping, per_request, is_prefill=True), lora_ids, slots, 1000)
    idx = torch.tensor([s for s, t in zip(slot_per_request, tokens, strict=True) for _ in range(t)])
    return wrapper, idx


STEPS = {  # (slot per request, tokens per request): the shapes a forward step takes
    "decode": ([k % 9 - 1 for k in range(18)], [1] * 18),  # 8 adapters and base, interleaved
    "mixed": ([0, 1, -1, 2, 3, 0, 1, 2, 3, -1, 1], [1, 1, 1, 1, 40, 1, 1, 1, 1, 30, 1]),
    "prefill": ([2, 0, -1, 2, 1], [20, 33, 17, 16, 5]),
}


@pytest.mark.parametrize("path", ["bmm", "loop"])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_matches_per_row_reference(monkeypatch, path, step, dtype):
    """``lora_linear`` (q/k/v in one pass) on every step shape and both short-row paths equals
    shrink-then-expand per row: shrink in fp32, expand in the model dtype, base rows untouched; the
    k slice, which no adapter of the batch trains, is skipped."""
    monkeypatch.setattr(vp, "_PLAN_CACHE", type(vp._PLAN_CACHE)())
    monkeypatch.setattr(vp, "_BATCHED_MAX_ROWS", 128 if path == "bmm" else 0)
    gen = torch.Generator().manual_seed(21)
    wrapper, idx = _wrapper(*STEPS[step], slots=8)
    n, hidden, rank, slices = idx.numel(), 64, 8, (64, 32, 32)
    x = torch.randn(n, hidden, generator=gen).to(dtype)
    a = tuple(torch.randn(8, 1, rank, hidden, generator=gen).to(dtype) / 8 for _ in slices)
    b = tuple(torch.randn(8, 1, size, rank, generator=gen).to(dtype) / 3 for size in slices)
    a[1].zero_(), b[1].zero_()
    vp.mark_live_slots([_Layer(a, b)])
    y0 = torch.randn(n, sum(slices), generator=gen).to(dtype)
    y = y0.clone()
    assert vp.lora_linear(wrapper, y, x, a, b, 0.5, slices) is True
    plan = vp._plan(*[t.tolist() for t in wrapper.prefill_metadata[2:0:-1]], x.device)
    assert (plan.batched is not None) == (path == "bmm" and step != "prefill")
    expected, offset = y0.double().clone(), 0
    for k, size in enumerate(slices):
        shrunk = 0.5 * _per_row(x, a[k], idx, torch.float32)
        expected[:, offset : offset + size] += _per_row(shrunk.float(), b[k], idx, dtype)
        offset += size
    _assert_close(y, expected, dtype)
    assert torch.equal(y[idx < 0], y0[idx < 0])
    assert torch.equal(y[:, 64:96], y0[:, 64:96]), "the k slice holds zeros for every slot: never touched"


def test_fused_layer_declines_what_it_does_not_handle():
    """vLLM's decode-metadata path and mismatched shapes go to upstream's ``add_lora_linear``, untouched."""
    wrapper, idx = _wrapper([0, 1], [2, 3], slots=2)
    x, y = torch.randn(5, 16), torch.zeros(5, 8)
    a, b = (torch.randn(2, 1, 4, 16),), (torch.randn(2, 1, 8, 4),)
    assert vp.lora_linear(wrapper, y[:4], x[:4], a, b, 1.0, (8,)) is False  # rows the step does not have
    assert vp.lora_linear(wrapper, y, x, a, b, 1.0, (6,)) is False  # a slice narrower than B's output
    wrapper.is_prefill = False
    assert vp.lora_linear(wrapper, y, x, a, b, 1.0, (8,)) is False
    assert torch.equal(y, torch.zeros(5, 8))


def test_slots_an_adapter_leaves_empty_are_never_multiplied_and_the_answer_is_unchanged():
    """vLLM zeroes an adapter's slot in layers it does not train (here: slot 1 of the k slice, and
    slot 2 everywhere but q); tagged by ``mark_live_slots``, those slots take the base-row path."""
    vp.register()
    wrapper, idx, x, a, b, slices = _qkv_case(torch.Generator().manual_seed(5))
    for k in (1, 2):
        a[k][2].zero_()
        b[k][2].zero_()
    a[1][1].zero_()
    b[1][1].zero_()
    vp.mark_live_slots([_Layer(a, b)])
    assert [getattr(t, vp._LIVE_ATTR) for t in a] == [{0, 1, 2, 3}, {0, 3}, {0, 1, 3}]  # slot 3: random, unused
    plan = vp._segment_plan(*_segments(idx)[1:3], a[1])
    assert {slot for slot, _ in plan.groups()} == {0}, "only slot 0 of the k slice is multiplied"

    y0 = torch.randn(idx.numel(), sum(slices), generator=torch.Generator().manual_seed(6))
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, 1.0, slices)
    torch.testing.assert_close(y.double(), _qkv_expected(y0, x, a, b, idx, slices), rtol=1e-5, atol=1e-5)


def test_an_activation_rereads_only_the_slot_it_wrote():
    """vLLM swaps adapters in and out when more are in use than ``max_loras``: the tag follows the
    rewritten slot (it becomes live, or empty) and the other slots keep theirs, unread."""
    gen = torch.Generator().manual_seed(8)
    a = (torch.randn(4, 1, 8, 64, generator=gen),)
    b = (torch.randn(4, 1, 64, 8, generator=gen),)
    a[0][1].zero_()
    layer = _Layer(a, b)
    vp.mark_live_slots([layer])
    assert getattr(a[0], vp._LIVE_ATTR) == {0, 2, 3}
    a[0][1].normal_(generator=gen)  # an adapter that trains this layer goes into slot 1 ...
    a[0][3].zero_()  # ... and slot 3 is changed behind the tag's back: with slot=1 it is not re-read
    vp.mark_live_slots([layer], slot=1)
    assert getattr(a[0], vp._LIVE_ATTR) == {0, 1, 2, 3}
    a[0][2].zero_()  # one that does not goes into slot 2
    vp.mark_live_slots([layer], slot=2)
    assert getattr(a[0], vp._LIVE_ATTR) == {0, 1, 3}
    assert getattr(b[0], vp._LIVE_ATTR) == {0, 1, 2, 3}


def test_the_manager_hook_tags_the_activated_slot():
    """Through vLLM's own ``LoRAModelManager.activate_adapter``: the slot vLLM chose is re-tagged."""
    from vllm.lora.model_manager import LoRAModelManager

    vp.register()
    a = (torch.zeros(2, 1, 8, 64),)
    layer = _Layer(a, (torch.zeros(2, 1, 64, 8),))
    vp.mark_live_slots([layer])

    class Manager:  # the state activate_adapter reads and writes, and a module whose set_lora fills the slot
        lora_index_to_id = [None, None]
        _active_adapters: dict = {}
        _registered_adapters = {7: type("LoRAModel", (), {"id": 7})()}
        modules = {"layer": layer}

        def _get_lora_layer_weights(self, model, name):
            a[0][0].fill_(1.0)  # written where vLLM would copy the adapter's A
            return None  # → reset_lora below; the fill stands for set_lora's copy

    layer.reset_lora = lambda index: None
    assert LoRAModelManager.activate_adapter(Manager(), 7) is True
    assert getattr(a[0], vp._LIVE_ATTR) == {0}


def test_a_layer_with_no_live_slot_in_the_batch_is_skipped_whole(monkeypatch):
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    vp.register()
    wrapper, idx, x, a, b, slices = _qkv_case(torch.Generator().manual_seed(7))
    for tensor in (*a, *b):
        tensor[:3].zero_()  # the batch uses slots 0-2: an adapter mix none of whose adapters trains this layer
    vp.mark_live_slots([_Layer(a, b)])

    def untouchable(*args, **kwargs):
        raise AssertionError("no LoRA product may be computed for a layer without live slots")

    # every product, fused or op by op, casts its operands through _cast first
    monkeypatch.setattr(vp, "_cast", untouchable)
    monkeypatch.setattr(punica_cpu, "sgmv_shrink", untouchable)
    y0 = torch.randn(idx.numel(), sum(slices))
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, 1.0, slices)
    assert torch.equal(y, y0)
    for tensor in (*a, *b):
        delattr(tensor, vp._LIVE_ATTR)  # untagged: every slot is multiplied again, as upstream
    with pytest.raises(AssertionError, match="no LoRA product"):
        wrapper.add_lora_linear(y, x, a, b, 1.0, slices)


# --- register() -----------------------------------------------------------------------------------------


def _vllm_root() -> Path:
    return Path(importlib.util.find_spec("vllm").origin).parent


def test_patched_modules_are_every_module_that_imports_the_ops():
    """Statically: each vLLM module that binds the torch op names (``from ...torch_ops... import``) is patched."""
    importers = set()
    pattern = re.compile(r"from\s+(vllm\.lora\.ops\.torch_ops(\.lora_ops)?|\.(lora_ops|torch_ops))\s+import")
    for path in _vllm_root().rglob("*.py"):
        if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
            rel = path.relative_to(_vllm_root().parent).with_suffix("")
            importers.add(".".join(rel.parts).removesuffix(".__init__"))
    importers.add(UPSTREAM_MODULE)  # where they are defined
    assert importers <= set(vp.PATCHED_MODULES), importers - set(vp.PATCHED_MODULES)


@pytest.mark.usefixtures("restore_vllm_modules")
def test_register_is_idempotent_and_leaves_no_original_bound():
    import vllm.lora.punica_wrapper.punica_cpu  # noqa: F401 - the wrapper module must be loaded too

    vp.register()
    vp.register()
    for name in vp.PATCHED_MODULES:
        module = sys.modules[name]
        assert getattr(module, vp._PATCHED_ATTR) is True
        for op in OPS:
            if op in module.__dict__:
                assert module.__dict__[op] is getattr(vp, op), (name, op)
    assert all(op in sys.modules["vllm.lora.punica_wrapper.punica_cpu"].__dict__ for op in OPS)
    # No loaded vLLM module still holds one of upstream's functions under any name.
    leftovers = [
        (mod_name, attr)
        for mod_name, module in list(sys.modules.items())
        if mod_name.startswith("vllm") and module is not None
        for attr, value in list(vars(module).items())
        if callable(value) and getattr(value, "__module__", None) == UPSTREAM_MODULE
    ]
    assert leftovers == []


def test_entry_point_is_the_vllm_general_plugin():
    from importlib.metadata import entry_points

    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "ragtune_cpu_lora_fix"]
    assert plugin.load() is vp.register
