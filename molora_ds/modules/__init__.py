from molora_ds.modules.experts import mixture_of_lora_experts
from molora_ds.modules.molora import MoLoRALinear
from molora_ds.modules.router import Router, top_k_gates

__all__ = ["MoLoRALinear", "Router", "mixture_of_lora_experts", "top_k_gates"]
