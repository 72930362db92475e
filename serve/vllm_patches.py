"""Fix for vLLM CPU multi-LoRA: base-model rows in a mixed batch got the last adapter applied.

vLLM's torch LoRA ops (``vllm/lora/ops/torch_ops/lora_ops.py``, used by the CPU punica wrapper)
gather the stacked LoRA weights with each row's adapter slot index. A row without LoRA carries
index ``-1``, and ``weights[-1]`` is the *last* slot, so in a batch that mixes base and adapter
requests the base rows were silently computed with an adapter. The fix gathers with the index
clamped to 0 and zeroes the contribution of rows whose index is negative.

This module is a vLLM *general plugin* (entry point ``vllm.general_plugins`` in pyproject.toml):
vLLM calls :func:`register` in every process it starts — including the spawned engine-core
process where the ops run — so a monkeypatch in the serving process alone would not be enough.
``tests/integration/test_api.py`` keeps a test that fails without it (base rows in a mixed batch
must equal base alone); set ``VLLM_PLUGINS=""`` to reproduce the upstream behaviour.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["bgmv_expand", "bgmv_expand_slice", "bgmv_shrink", "register"]

logger = logging.getLogger(__name__)
_PATCHED_ATTR = "_ragtune_masked"


def _masked_lora_product(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """``inputs[i] @ weights[indices[i]].T`` per row, and exactly zero where ``indices[i] < 0``."""
    valid = indices >= 0
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), selected)
    return outputs * valid.to(dtype=dtype).unsqueeze(-1)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """Masked replacement for vLLM's ``bgmv_shrink`` (same signature and semantics otherwise)."""
    outputs = _masked_lora_product(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """Masked replacement for vLLM's ``bgmv_expand``."""
    outputs = _masked_lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # LoRA adapter and model may add different amounts of padding to the output.
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    """Masked replacement for vLLM's ``bgmv_expand_slice``."""
    outputs = _masked_lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


_REPLACEMENTS = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def register() -> None:
    """vLLM plugin entry point: install the masked ops wherever vLLM bound the originals.

    ``sgmv_*`` call ``bgmv_*`` through the ``lora_ops`` module globals, and the CPU punica wrapper
    imported the names into its own namespace, so both modules (and the package) are patched.
    Idempotent: vLLM may call plugins more than once per process.
    """
    import importlib

    modules = ["vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu"]
    for name in modules:
        module = importlib.import_module(name)
        if getattr(module, _PATCHED_ATTR, False):
            continue
        for op, replacement in _REPLACEMENTS.items():
            if hasattr(module, op):
                setattr(module, op, replacement)
        setattr(module, _PATCHED_ATTR, True)
    logger.debug("ragtune: masked CPU LoRA ops installed (no-LoRA rows no longer use the last slot)")
