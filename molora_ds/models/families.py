"""Model families: which transformers class loads a model, and which linear layers MoLoRA adapts.

The default targets (``molora_ds.inject.DEFAULT_TARGETS``, used when ``molora.target_modules`` is
null) are the attention query and value projections, as in the paper:

- **GLM-4-9B** as transformers' native ``GlmForCausalLM`` (model_type ``glm``; checkpoints such as
  ``THUDM/glm-4-9b-hf``), targets ``q_proj``/``v_proj``. The paper's code loaded GLM through its remote
  code (``trust_remote_code``, model_type ``chatglm``), whose attention has one fused
  ``query_key_value`` Linear (4096 -> 4608), and adapted that. The native class splits it into
  ``q_proj`` (4096 -> 4096), ``k_proj`` and ``v_proj`` (4096 -> 256 each: 2 KV heads of 128). We target
  q and v because (a) that is the adapter the paper describes and uses for its other models,
  (b) an expert on the fused layer would also adapt the keys, and with one router per Linear it
  would route q, k and v together, and (c) the native class is what current transformers,
  DeepSpeed and PEFT support without remote code. A reproduction that wants the fused layer
  loads the remote-code checkpoint with ``trust_remote_code: true`` and sets
  ``target_modules: [query_key_value]``. The MLP's ``gate_up_proj`` is fused too (4096 -> 27392);
  it is not a default target.
- **LLaVA-1.5** as ``LlavaForConditionalGeneration`` (model_type ``llava``): the language model's
  ``q_proj``/``v_proj`` only (a regex on ``language_model``). The CLIP vision tower and the
  projector stay frozen, as does everything MoLoRA does not wrap. The paper's code also adapted
  the CLIP tower (its targets included ``q,k,v,o`` and ``out_proj`` everywhere);
  ``molora.include_vision: true`` adds the tower's ``q_proj``/``v_proj``.
- **Llama-3.2-1B/3B**, SmolLM2 and any other causal LM (``AutoModelForCausalLM``) whose attention
  has ``q_proj``/``v_proj``: those. Other layouts name their targets in the recipe.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# model_type -> the class that loads it, where AutoModelForCausalLM does not.
VISION_LANGUAGE = {"llava": LlavaForConditionalGeneration}


def model_class(config: PretrainedConfig, trust_remote_code: bool = False) -> type:
    """The class to load ``config`` with, or a one-line ValueError if the trainer cannot train it."""
    model_type = config.model_type
    if model_type in VISION_LANGUAGE:
        return VISION_LANGUAGE[model_type]
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or remote:
        return AutoModelForCausalLM
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    raise ValueError(
        f"model_type {model_type!r} ({arch}) is not a model the trainer can train: it trains causal LMs "
        f"(AutoModelForCausalLM: Llama, GLM, ...) and {', '.join(c.__name__ for c in VISION_LANGUAGE.values())}"
    )
