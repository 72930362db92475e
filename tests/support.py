"""Shared test helpers: random-but-deterministic LoRA adapters for the tiny model."""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_random_adapter"]


def make_random_adapter(base_path: str | Path, dest: str | Path, *, seed: int, r: int = 8,
                        scale: float = 0.5, target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj")) -> Path:
    """Save a PEFT LoRA adapter with random A *and* B (PEFT initialises B to zero = no effect).

    ``scale`` multiplies the random weights so greedy outputs visibly change on the tiny model.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), lora_dropout=0.0,
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * scale)
    peft_model.save_pretrained(str(dest))
    return Path(dest)
