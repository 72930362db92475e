"""vLLM CPU multi-LoRA ops, fixed and grouped: correct for base rows, and rows grouped by adapter.

vLLM 0.32's torch LoRA ops (``vllm/lora/ops/torch_ops/lora_ops.py``, the only ones the CPU punica
wrapper ``vllm/lora/punica_wrapper/punica_cpu.py`` calls) have two problems this module fixes:

1. **Correctness.** They gather the stacked LoRA weights with each row's adapter slot index. A row
   without LoRA carries index ``-1``, and ``weights[-1]`` is the *last* slot, so in a batch that
   mixes base and adapter requests the base rows were silently computed with an adapter. Here a
   row with a negative index gets exactly zero LoRA contribution: it is never multiplied at all
   (ops that add leave it untouched; ops that assign write 0, which is what the op would have
   produced for a zero product).
2. **Speed.** ``weights[indices]`` copies a whole ``[out, in]`` adapter matrix *per token row*
   (``[num_tokens, out, in]``, e.g. 4096 prefill tokens × 1536 × 16 fp32 = 400 MB for one MLP
   projection of one layer), then ``einsum`` does ``num_tokens`` matrix-vector products. With
   256-token prompts and 8 adapters that made serving 0.22× the base model. Here rows are grouped
   by adapter and multiplied by that adapter's weights in place (no weight copy unless a dtype
   cast needs one), a few big matmuls instead of one matrix-vector product per token:

   - prefill segments (runs of >= 16 rows with one slot): one ``addmm_`` each, straight from the
     input view into the output view — nothing gathered, nothing scattered;
   - short runs (decode tokens): one gather of those rows, ONE matmul per adapter on its block,
     one ``index_add_``/``index_copy_`` back; and for small batches (<= 128 rows, i.e. decode) all
     adapters' blocks in a single ``bmm``, because there per-op dispatch (~10 µs), not arithmetic,
     is the cost (see ``_Plan``).

   - slots an adapter leaves empty in a layer (modules it does not train; vLLM zeroes them) are
     never multiplied, and a layer with no live slot in the batch is skipped whole (see
     ``mark_live_slots``);
   - a whole LoRA linear layer (q, k and v of a merged projection together) runs in one pass
     (``lora_linear``, in place of ``PunicaWrapperCPU.add_lora_linear``): the grouping is derived
     and the decode rows gathered once per layer instead of once per op, no zeroed buffers, one
     scatter back — in a decode step, per-op dispatch is the cost, so this is the op count halved.

   Measured with ``loadtests/lora_microbench.py`` (SmolLM2-135M shapes, 8 adapters, 16 requests,
   fp32, one core, ranks 8/16; CPU ms per forward step, all 30 layers' LoRA work): 16 × 256-token
   prefill 28,000-53,000 → ~900 (the layers' own matmuls: ~10,500); 16-request decode 80-140 →
   26-36 (own matmuls: ~55).

``sgmv_*`` (the prefill ops — and, on CPU, vLLM V1 *always* takes them: ``LoRAMapping(...,
is_prefill=True)`` in ``v1/worker/lora_model_runner_mixin.py``, so decode steps come here too)
receive per-segment metadata (``seq_len_tensor`` / ``lora_indices_tensor``: runs of consecutive
tokens with the same slot, from ``torch.unique_consecutive`` in ``compute_meta``). Upstream expands
that back to a per-token index with ``repeat_interleave`` and calls ``bgmv_*``; here the segments
are used directly (no per-token index is built). ``bgmv_*`` (used by the logits/classifier paths)
derive the same runs with one ``torch.unique_consecutive``. Both end in the same grouped kernel.

Semantics kept from upstream, op by op (and checked against a per-row reference in
``tests/unit/test_vllm_patches.py``): products are computed in ``output_tensor.dtype`` (inputs and
weights cast to it); 4-D stacked weights ``[slots, 1, out, in]`` are squeezed to 3-D; shrink
*assigns* ``scaling * x @ A.T`` to ``output[:, :rank]``; expand writes/adds ``output[:, :common_len]``
with ``common_len = min(out, output width)`` (adapter and model may pad differently) and, when the
product has one row but the output more, broadcasts that row (upstream's ``limit = 1``, which
plain broadcasting of ``outputs[:limit]`` would do anyway); expand_slice
writes/adds ``output[:, offset:offset + size]``. Inputs whose row counts don't line up the usual
way (one row broadcast, or more product rows than output rows) take an exact fallback that builds
the product densely and then runs upstream's epilogue verbatim.

This module is a vLLM *general plugin* (entry point ``vllm.general_plugins`` in pyproject.toml):
vLLM calls :func:`register` in every process it starts — including the spawned engine-core
process where the ops run — so a monkeypatch in the serving process alone would not be enough.
``tests/integration/test_api.py`` keeps a test that fails without it (base rows in a mixed batch
must equal base alone); set ``VLLM_PLUGINS=""`` to reproduce the upstream behaviour.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

__all__ = [
    "bgmv_expand",
    "bgmv_expand_slice",
    "bgmv_shrink",
    "lora_linear",
    "mark_live_slots",
    "register",
    "sgmv_expand",
    "sgmv_expand_slice",
    "sgmv_shrink",
]

logger = logging.getLogger(__name__)
_PATCHED_ATTR = "_ragtune_masked"

# How one op call's rows map to adapter slots, derived from the runs of consecutive rows with the
# same slot (what vLLM's ``compute_meta`` hands ``sgmv_*``). Three ways to run it; all multiply
# each row by its own adapter exactly once and never read a weight matrix per row:
# - ``runs``: ``(slot, slice)`` for every run of at least ``_INPLACE_MIN_ROWS`` rows (prefill
#   segments) and for a slot's only run whatever its length. Inputs and outputs are plain views:
#   ``addmm_`` writes straight into the output, nothing is gathered or copied. An adapter used by
#   two prompts of a batch thus does two matmuls, not one on a gathered copy: at 16 × 256 tokens
#   over 8 adapters that is ~3× cheaper (gate_up expand 5.0 vs 14.4 ms; the copies cost more than
#   a second ``[256, 16] @ [16, 1536]`` call).
# - ``packed_rows`` + ``packed``: the rows of the remaining (short) runs, ordered slot by slot —
#   decode steps of interleaved requests, one token each. They are gathered with ONE
#   ``index_select``, each slot does ONE matmul on its ``[begin:end]`` block of that copy, and ONE
#   ``index_add_``/``index_copy_`` scatters the result back.
# - ``batched`` (at most ``_BATCHED_MAX_ROWS`` short-run rows over 2+ slots: a decode step, or the
#   decode tokens of a step that also prefills a prompt, the steady state under load, whose long
#   runs still go in place): the packed grouping as ONE ``bmm``. At 16 rows over 8 adapters each
#   matmul is [2, 576] @ [576, 16] — ~3 µs of work under ~10 µs of per-op dispatch, so a Python loop of 8 matmuls costs ~100 µs per op call, and a step
#   makes ~420 calls. Instead the rows are laid out as ``[slots, m, in]`` (``m`` = most rows any
#   slot has; shorter slots padded with a dummy row whose result is dropped), multiplied by the
#   stacked weights ``[lo:hi+1]`` — a view, never a gather — in one ``bmm`` and scattered back with
#   one ``index_add_``/``index_copy_``: ~30 µs per op call. Used only while padding at most doubles
#   the rows multiplied (+8), so a skewed batch takes the loop.
#   In the mixed step of ``loadtests/lora_microbench.py`` (15 decode rows + a 256-token prefill over
#   8 adapters, rank 16, all four LoRA layers) the loop cost 113 ms of LoRA CPU per forward step, the
#   bmm 87 ms (the layers' own matmuls: 368 ms).
# ``negatives`` are the rows with a negative slot (no LoRA); they are never multiplied.
_INPLACE_MIN_ROWS = 16
_BATCHED_MAX_ROWS = 128  # above this the matmuls dominate and per-op dispatch no longer matters


class _Plan:
    __slots__ = ("batched", "n_rows", "negatives", "packed", "packed_rows", "runs", "short")

    def __init__(self, slots: list[int], lengths: list[int], device: torch.device):
        by_slot: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for slot, length in zip(slots, lengths, strict=True):
            if length > 0:
                by_slot.setdefault(slot, []).append((start, length))
            start += length
        self.n_rows = start
        self.runs: list[tuple[int, slice]] = []
        self.negatives: list[slice | torch.Tensor] = []
        self.packed: list[tuple[int, int, int]] = []
        # Each slot's rows outside long runs; a batch mixing decode tokens and a prefill chunk (the
        # steady state under load) multiplies these in one bmm and the long runs in place.
        self.short: dict[int, list[int]] = {}
        for slot, slot_runs in by_slot.items():
            if slot < 0 and len(slot_runs) == 1:
                first, length = slot_runs[0]
                self.negatives.append(slice(first, first + length))
            elif slot < 0:
                rows = [r for first, length in slot_runs for r in range(first, first + length)]
                self.negatives.append(torch.tensor(rows, dtype=torch.long, device=device))
            else:
                short = [r for first, length in slot_runs if length < _INPLACE_MIN_ROWS
                         for r in range(first, first + length)]
                if short:
                    self.short[slot] = short
        self.batched = self._batched_layout(device)
        packed_rows: list[int] = []
        for slot, slot_runs in by_slot.items():
            if slot < 0:
                continue
            short = []
            for first, length in slot_runs:
                if length >= _INPLACE_MIN_ROWS or (self.batched is None and len(slot_runs) == 1):
                    self.runs.append((slot, slice(first, first + length)))
                elif length < _INPLACE_MIN_ROWS:
                    short.append((first, length))
            if short and self.batched is None:
                begin = len(packed_rows)
                packed_rows.extend(r for first, length in short for r in range(first, first + length))
                self.packed.append((slot, begin, len(packed_rows)))
        self.packed_rows = torch.tensor(packed_rows, dtype=torch.long, device=device) if packed_rows else None

    def _batched_layout(self, device: torch.device):
        """``(lo, hi, gather, keep, rows)`` for the one-``bmm`` path over the short rows, or None.

        ``gather`` (flattened ``[hi-lo+1, m]``) lists slot ``lo``'s short rows, then ``lo+1``'s, ...,
        each padded to ``m`` with a dummy row; ``keep`` picks the real entries of the flattened
        ``[(hi-lo+1) * m]`` product (None when there is no padding) and ``rows`` are their output
        rows, in the same order.
        """
        rows_of = self.short
        n_valid = sum(len(rows) for rows in rows_of.values())
        if len(rows_of) < 2 or n_valid > _BATCHED_MAX_ROWS:
            return None  # one slot: the loop does a single matmul; many rows: the matmuls dominate
        lo, hi = min(rows_of), max(rows_of)
        m = max(len(rows) for rows in rows_of.values())
        if (hi - lo + 1) * m > 2 * n_valid + 8:
            return None
        dummy = next(iter(rows_of.values()))[0]
        gather, keep, rows = [], [], []
        for k, slot in enumerate(range(lo, hi + 1)):
            slot_rows = rows_of.get(slot, [])
            gather.append(slot_rows + [dummy] * (m - len(slot_rows)))
            keep.extend(range(k * m, k * m + len(slot_rows)))
            rows.extend(slot_rows)
        padded = len(keep) != (hi - lo + 1) * m
        return (lo, hi, torch.tensor(gather, dtype=torch.long, device=device).view(-1),
                torch.tensor(keep, dtype=torch.long, device=device) if padded else None,
                torch.tensor(rows, dtype=torch.long, device=device))

    def groups(self) -> list[tuple[int, slice | torch.Tensor]]:
        """``(slot, rows)`` for every slot >= 0 (for the dense fallback)."""
        if self.batched is not None:
            device = self.batched[2].device
            short = [(slot, torch.tensor(rows, dtype=torch.long, device=device)) for slot, rows in self.short.items()]
        else:
            short = [(slot, self.packed_rows[begin:end]) for slot, begin, end in self.packed]
        return [*self.runs, *short]


# The plan depends only on the run metadata, which is identical for the ~14 LoRA op calls per
# decoder layer of one forward step (30 layers → ~420 calls for SmolLM2-135M), so it is cached by
# *content* (the runs as Python ints — never by tensor identity: vLLM refills its metadata buffers
# in place). A decode step's key is ~2×16 ints; 64 entries keep a few steps' worth, a few kB.
_PLAN_CACHE: OrderedDict[tuple, _Plan] = OrderedDict()
_PLAN_CACHE_SIZE = 64


def _plan(slots: list[int], lengths: list[int], device: torch.device) -> _Plan:
    key = (tuple(slots), tuple(lengths), device)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = _PLAN_CACHE[key] = _Plan(slots, lengths, device)
        if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    else:
        _PLAN_CACHE.move_to_end(key)
    return plan


def _token_plan(indices: torch.Tensor, weights: torch.Tensor) -> _Plan:
    """Plan from a per-token slot index (the ``bgmv_*`` calling convention): one unique_consecutive."""
    slots, counts = torch.unique_consecutive(indices, return_counts=True)
    return _plan(_without_empty(slots.tolist(), weights), counts.tolist(), indices.device)


def _segment_plan(seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor, weights: torch.Tensor) -> _Plan:
    """Plan from ``sgmv_*`` segment metadata, without expanding it to a per-token index.

    Upstream ignores ``b_seq_start_loc`` and explodes the segments with ``repeat_interleave``, i.e.
    segment ``k`` covers the rows after segments ``0..k-1``; that is the rule kept here (vLLM's
    ``compute_meta`` makes the start offsets equal those cumulative sums anyway).
    """
    return _plan(_without_empty(lora_indices_tensor.tolist(), weights), seq_len_tensor.tolist(),
                 lora_indices_tensor.device)


# ---- adapters that leave a layer out -------------------------------------------------------------
# vLLM wraps every supported projection of every layer with LoRA, but an adapter usually trains a
# few of them (PEFT's default for Llama is q_proj and v_proj; ragtune's bench adapters q, v, o): for
# a module the adapter lacks, vLLM zeroes that adapter's slot (``reset_lora``), and for a merged
# qkv the missing slices. Multiplying by those zeros was half of an 8-adapter mix's LoRA work
# (gate_up and down: 6 of the 14 op calls per layer). So after each adapter activation (the only
# place vLLM writes the stacked weights) every stacked tensor is tagged with the slots whose weights
# are not all zero; an op treats the other slots like base rows (no contribution: never
# multiplied), and a linear layer none of whose slices has a live slot in the batch is skipped
# before vLLM allocates its buffers. A tensor without the tag (not from a manager activation) is
# multiplied for every slot, as before.
_LIVE_ATTR = "_ragtune_live_slots"


def _without_empty(slots: list[int], weights: torch.Tensor) -> list[int]:
    """``slots`` with every slot whose weights in ``weights`` are all zero replaced by -1."""
    live = getattr(weights, _LIVE_ATTR, None)
    if live is None or all(s < 0 or s in live for s in slots):
        return slots
    return [s if s in live else -1 for s in slots]


def mark_live_slots(modules, slot: int | None = None) -> None:
    """Tag each LoRA layer's stacked A/B tensors with the slots that hold nonzero weights.

    With ``slot``, only that slot was rewritten (an activation writes one slot): only its weights are
    read, and the other slots keep their tags — with more adapters than ``max_loras`` vLLM swaps
    adapters in and out all the time, and re-reading every slot of every layer on each swap cost
    ``max_loras`` times the copy it follows. A tensor never tagged is read whole.
    """
    for module in modules:
        for name in ("lora_a_stacked", "lora_b_stacked"):
            stacked = getattr(module, name, None)
            for tensor in stacked if isinstance(stacked, tuple | list) else (stacked,):
                if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
                    continue
                known = getattr(tensor, _LIVE_ATTR, None)
                if slot is None or known is None:
                    live = frozenset(tensor.flatten(1).ne(0).any(dim=1).nonzero().flatten().tolist())
                elif bool(tensor[slot].ne(0).any()):
                    live = known | {slot}
                else:
                    live = known - {slot}
                setattr(tensor, _LIVE_ATTR, live)


def _live_in_batch(weights: torch.Tensor, batch_slots: list[int]) -> bool:
    live = getattr(weights, _LIVE_ATTR, None)
    return live is None or any(s in live for s in batch_slots)


def _patch_lora_manager() -> None:
    from vllm.lora.model_manager import LoRAModelManager

    activate = LoRAModelManager.activate_adapter
    if getattr(activate, _PATCHED_ATTR, False):
        return

    def activate_adapter(self, lora_id: int) -> bool:
        changed = activate(self, lora_id)
        if changed:
            mark_live_slots(self.modules.values(), self.lora_index_to_id.index(lora_id))
        return changed

    setattr(activate_adapter, _PATCHED_ATTR, True)
    LoRAModelManager.activate_adapter = activate_adapter


def _patch_punica_cpu() -> None:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    add_lora_linear = PunicaWrapperCPU.add_lora_linear
    if getattr(add_lora_linear, _PATCHED_ATTR, False):
        return

    def add_lora_linear_fused(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs):
        if not kwargs and lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices):
            return None  # CPU updates y in place (what upstream returns too)
        return add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)

    setattr(add_lora_linear_fused, _PATCHED_ATTR, True)
    PunicaWrapperCPU.add_lora_linear = add_lora_linear_fused


# ---- one LoRA linear layer, all its slices at once -----------------------------------------------
# Upstream's ``add_lora_linear`` runs a layer as 2 × slices separate ops (q, k, v: three shrinks into
# three zeroed fp32 buffers, then three expands), each of which re-derives the batch's grouping and,
# for decode tokens, gathers the same input rows again. In a decode step (16 rows) the arithmetic
# is ~3 µs per op and the rest is dispatch, so the layer's cost is its op count. Here the grouping
# is derived once per layer, the input rows are gathered once, each slice is one bmm for the shrink
# and one for the expand, and one ``index_add_`` writes every slice's product back.


def lora_linear(punica, y: torch.Tensor, x: torch.Tensor, lora_a_stacked, lora_b_stacked, scale: float,
                output_slices) -> bool:
    """``y[:, slice k] += scale * x @ A_k[slot].T @ B_k[slot].T`` for each row with a slot >= 0.

    ``punica`` is vLLM's ``PunicaWrapperCPU`` (its per-step segment metadata). The same products as
    upstream's ``add_shrink`` + ``add_expand``: the shrink in float32 (upstream's buffer dtype), the
    expand in ``y.dtype``; rows without LoRA are left untouched. Slices whose slots in this batch all
    hold zeros (modules the adapters do not train) are skipped. Returns False, having written
    nothing, for the cases it does not handle (vLLM's decode-metadata path, unusual shapes); the
    caller then runs upstream's ``add_lora_linear`` (with the grouped ops above).
    """
    if not punica.is_prefill:
        return False
    if punica.no_lora:
        return True  # upstream's sgmv calls return at once: nothing to add
    _, lengths, slots_t, *_ = punica.prefill_metadata
    plan = _plan(slots_t.tolist(), lengths.tolist(), x.device)
    a3 = [_as_3d(a) for a in lora_a_stacked]
    b3 = [_as_3d(b) for b in lora_b_stacked]
    if (x.dim() != 2 or y.dim() != 2 or x.shape[0] != plan.n_rows or y.shape[0] != plan.n_rows
            or any(b.shape[1] != size for b, size in zip(b3, output_slices, strict=True))
            or sum(output_slices) > y.shape[1]):
        return False
    batch_slots = [slot for slot, _ in plan.runs] + list(plan.short)
    offsets = [sum(output_slices[:k]) for k in range(len(output_slices))]
    live = [k for k in range(len(a3)) if _live_in_batch(lora_a_stacked[k], batch_slots)
            and _live_in_batch(lora_b_stacked[k], batch_slots)]
    if not live:
        return True  # every slice adds x @ 0 @ 0
    dtype, f32 = y.dtype, torch.float32
    for slot, rows in plan.runs:  # prefill segments (and, without a bmm layout, lone short runs): in place
        x_rows = _cast(x[rows], f32)
        for k in live:
            shrunk = x_rows @ _cast(a3[k][slot], f32).T
            if scale != 1.0:
                shrunk.mul_(scale)
            y[rows, offsets[k] : offsets[k] + output_slices[k]].addmm_(_cast(shrunk, dtype), _cast(b3[k][slot], dtype).T)
    if plan.batched is not None:
        _lora_linear_batched(plan, y, x, a3, b3, scale, output_slices, offsets, live)
    elif plan.packed_rows is not None:
        x_rows = _cast(x.index_select(0, plan.packed_rows), f32)
        for k in live:
            product = torch.empty(x_rows.shape[0], output_slices[k], dtype=dtype, device=y.device)
            for slot, begin, end in plan.packed:
                shrunk = x_rows[begin:end] @ _cast(a3[k][slot], f32).T
                if scale != 1.0:
                    shrunk.mul_(scale)
                torch.mm(_cast(shrunk, dtype), _cast(b3[k][slot], dtype).T, out=product[begin:end])
            y[:, offsets[k] : offsets[k] + output_slices[k]].index_add_(0, plan.packed_rows, product)
    return True


def _lora_linear_batched(plan: _Plan, y, x, a3, b3, scale, output_slices, offsets, live) -> None:
    """The short rows of :func:`lora_linear`: gathered once; per slice one shrink and one expand bmm."""
    lo, hi, gather, keep, rows = plan.batched
    dtype, f32 = y.dtype, torch.float32
    full = hi + 1 - lo
    x_rows = _cast(x.index_select(0, gather).view(full, -1, x.shape[1]), f32)
    products = []
    for k in live:
        a, b = a3[k], b3[k]
        if lo != 0 or hi + 1 != a.shape[0]:
            a, b = a[lo : hi + 1], b[lo : hi + 1]
        shrunk = torch.bmm(x_rows, _cast(a, f32).transpose(1, 2))
        if scale != 1.0:
            shrunk.mul_(scale)
        products.append(torch.bmm(_cast(shrunk, dtype), _cast(b, dtype).transpose(1, 2)))
    if len(live) == len(output_slices) and sum(output_slices) == y.shape[1]:
        product = (torch.cat(products, dim=2) if len(products) > 1 else products[0]).view(-1, y.shape[1])
        y.index_add_(0, rows, product if keep is None else product.index_select(0, keep))
        return
    for k, product in zip(live, products, strict=True):
        product = product.view(-1, output_slices[k])
        y[:, offsets[k] : offsets[k] + output_slices[k]].index_add_(
            0, rows, product if keep is None else product.index_select(0, keep))


def _as_3d(weights: torch.Tensor) -> torch.Tensor:
    """``[slots, 1, out, in]`` → ``[slots, out, in]`` (a view), as upstream's ``squeeze(dim=1)``."""
    return weights.squeeze(dim=1) if weights.dim() == 4 else weights


def _dense_product(inputs: torch.Tensor, weights: torch.Tensor, plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, out]``: row ``i`` is ``inputs[i] @ W[slot(i)].T`` in ``dtype``, 0 for negative slots.

    The fallback for unusual row counts; it mirrors ``einsum("bi, boi -> bo")``'s broadcasting of a
    single input row or a single index over the other operand.
    """
    groups, n_rows = plan.groups(), plan.n_rows
    if inputs.shape[0] == 1 and n_rows != 1:
        inputs = inputs.expand(n_rows, -1)
    elif n_rows == 1 and inputs.shape[0] != 1:
        n_rows = inputs.shape[0]
        groups = [(slot, slice(0, n_rows)) for slot, _ in groups]
    elif inputs.shape[0] != n_rows:
        raise RuntimeError(f"LoRA op: {inputs.shape[0]} input rows but {n_rows} lora indices")
    product = torch.zeros(n_rows, weights.shape[1], dtype=dtype, device=inputs.device)
    for slot, rows in groups:
        product[rows] = inputs[rows].to(dtype) @ weights[slot].to(dtype).T
    return product


def _apply_grouped(inputs: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, plan: _Plan,
                   *, add: bool, alpha: float = 1.0) -> None:
    """``out[rows] (+)= alpha * inputs[rows] @ weights[slot, :out_cols].T`` for every slot's rows.

    One matmul per long run (in place) plus one per slot for its short runs (packed), or a single
    ``bmm`` for a small batch.

    ``out`` is the (possibly column-sliced) ``[rows, out_cols]`` view being written, in the compute
    dtype; ``weights`` is 3-D. Negative slots are never multiplied: with ``add`` their rows are left
    untouched, otherwise they are set to 0 (the value a zero product assigns).
    """
    dtype = out.dtype
    width = out.shape[1]
    beta = 1.0 if add else 0.0  # beta=0: addmm ignores out's old contents (even NaN/inf garbage)
    # _cast(weights[slot, :width], dtype).T is this adapter's [in, out_cols] matrix: a view unless the
    # dtype differs (then out×in elements, e.g. 1536×16, are cast once per adapter, not per row).
    for slot, rows in plan.runs:
        out[rows].addmm_(_cast(inputs[rows], dtype), _cast(weights[slot, :width], dtype).T, beta=beta, alpha=alpha)
    if plan.batched is not None:
        _apply_batched(inputs, weights, out, plan, add=add, alpha=alpha)
    elif plan.packed_rows is not None:
        packed_in = _cast(inputs.index_select(0, plan.packed_rows), dtype)
        packed_out = torch.empty(packed_in.shape[0], width, dtype=dtype, device=out.device)
        for slot, begin, end in plan.packed:
            packed_out[begin:end].addmm_(packed_in[begin:end], _cast(weights[slot, :width], dtype).T, beta=0.0,
                                         alpha=alpha)
        if add:
            out.index_add_(0, plan.packed_rows, packed_out)
        else:
            out.index_copy_(0, plan.packed_rows, packed_out)
    if not add:
        _zero_rows(out, plan.negatives)


def _apply_batched(inputs: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, plan: _Plan, *, add: bool,
                   alpha: float) -> None:
    """The short rows of :func:`_apply_grouped`, every slot's in one ``bmm`` (see ``_Plan``)."""
    lo, hi, gather, keep, rows = plan.batched
    dtype, width = out.dtype, out.shape[1]
    # [slots, m, in] @ [slots, in, width]: the weights are a view of the stacked tensor (cast only
    # if the dtype differs: at most (hi-lo+1) × width × in elements, e.g. 8 × 16 × 576).
    # (Each skipped no-op slice/cast below is ~1 µs; a decode step makes ~420 of these calls.)
    if lo != 0 or hi + 1 != weights.shape[0] or width != weights.shape[1]:
        weights = weights[lo : hi + 1, :width]
    packed_in = inputs.index_select(0, gather).view(hi - lo + 1, -1, inputs.shape[1])  # (faster than inputs[2-D])
    product = torch.bmm(_cast(packed_in, dtype), _cast(weights, dtype).transpose(1, 2))
    product = product.view(-1, width)
    if keep is not None:
        product = product.index_select(0, keep)
    if alpha != 1.0:
        product.mul_(alpha)
    if add:
        out.index_add_(0, rows, product)
    else:
        out.index_copy_(0, rows, product)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _zero_rows(out: torch.Tensor, negatives: list[slice | torch.Tensor]) -> None:
    """What an assigning op writes for base rows: the zero product (whatever the buffer held)."""
    for rows in negatives:
        if isinstance(rows, slice):
            out[rows].zero_()
        else:
            out.index_fill_(0, rows, 0)


def _shrink(inputs, lora_a_weights, output_tensor, plan: _Plan, scaling: float) -> None:
    weights = _as_3d(lora_a_weights)
    rank = weights.shape[1]
    if inputs.shape[0] == plan.n_rows == output_tensor.shape[0] and rank <= output_tensor.shape[1]:
        out = output_tensor if rank == output_tensor.shape[1] else output_tensor[:, :rank]
        _apply_grouped(inputs, weights, out, plan, add=False, alpha=scaling)
        return
    outputs = _dense_product(inputs, weights, plan, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]  # upstream's epilogue


def _expand(inputs, lora_b_weights, output_tensor, plan: _Plan, add_inputs: bool) -> None:
    weights = _as_3d(lora_b_weights)
    # LoRA adapter and model may add different amounts of padding to the output.
    common_len = min(weights.shape[1], output_tensor.shape[1])
    if inputs.shape[0] == plan.n_rows == output_tensor.shape[0]:
        out = output_tensor if common_len == output_tensor.shape[1] else output_tensor[:, :common_len]
        _apply_grouped(inputs, weights, out, plan, add=add_inputs)
        return
    outputs = _dense_product(inputs, weights, plan, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def _expand_slice(inputs, lora_b_weights, output_tensor, plan: _Plan, slice_offset: int,
                  slice_size: int, add_inputs: bool) -> None:
    weights = _as_3d(lora_b_weights)
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    if inputs.shape[0] == plan.n_rows == output_tensor.shape[0] and weights.shape[1] == target.shape[1]:
        _apply_grouped(inputs, weights, target, plan, add=add_inputs)
        return
    outputs = _dense_product(inputs, weights, plan, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


# --- the six vLLM entry points (same signatures as vllm.lora.ops.torch_ops) -----------------------


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """``output[:, :rank] = scaling * inputs @ A[slot].T`` per row; 0 for rows with a negative slot."""
    _shrink(inputs, lora_a_weights, output_tensor, _token_plan(lora_indices_tensor, lora_a_weights), scaling)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """``output[:, :common_len] (+)= inputs @ B[slot].T`` per row; no contribution for negative slots."""
    _expand(inputs, lora_b_weights, output_tensor, _token_plan(lora_indices_tensor, lora_b_weights), add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    """``output[:, offset:offset+size] (+)= inputs @ B[slot].T`` per row; none for negative slots."""
    _expand_slice(inputs, lora_b_weights, output_tensor, _token_plan(lora_indices_tensor, lora_b_weights),
                  slice_offset,
                  slice_size, add_inputs)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches: int, max_seq_length: int, token_nums: int, scaling: float):
    """Segment form of :func:`bgmv_shrink` (one slot per run of ``seq_len_tensor[k]`` rows)."""
    _shrink(inputs, lora_a_weights, output_tensor, _segment_plan(seq_len_tensor, lora_indices_tensor, lora_a_weights),
            scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches: int, max_seq_length: int, token_nums: int, add_inputs: bool = False):
    """Segment form of :func:`bgmv_expand`."""
    _expand(inputs, lora_b_weights, output_tensor, _segment_plan(seq_len_tensor, lora_indices_tensor, lora_b_weights),
            add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                      lora_indices_tensor, batches: int, max_seq_length: int, token_nums: int,
                      slice_offset: int, slice_size: int, add_inputs: bool = False):
    """Segment form of :func:`bgmv_expand_slice`."""
    _expand_slice(inputs, lora_b_weights, output_tensor,
                  _segment_plan(seq_len_tensor, lora_indices_tensor, lora_b_weights),
                  slice_offset, slice_size, add_inputs)


_REPLACEMENTS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}

# Every module that holds its own binding of the op names: the defining module, the package that
# re-exports them, and the CPU punica wrapper, which did ``from vllm.lora.ops.torch_ops import ...``
# at import time (so patching only the defining module would not reach it).
PATCHED_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops",
                   "vllm.lora.punica_wrapper.punica_cpu")


def register() -> None:
    """vLLM plugin entry point: install the grouped, masked ops wherever vLLM bound the originals.

    Idempotent: vLLM may call plugins more than once per process; the names are simply rebound to
    the same functions, and the module marker only keeps the log quiet.
    """
    import importlib

    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        for op, replacement in _REPLACEMENTS.items():
            if hasattr(module, op):
                setattr(module, op, replacement)
        if not getattr(module, _PATCHED_ATTR, False):
            setattr(module, _PATCHED_ATTR, True)
            logger.debug("ragtune: grouped, masked CPU LoRA ops installed in %s", name)
    _patch_lora_manager()
    _patch_punica_cpu()
