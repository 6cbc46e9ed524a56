"""molora_ds: mixture of low-rank experts with Riemannian optimizers, on DeepSpeed."""

from molora_ds.config import MoLoRAConfig
from molora_ds.inject import apply_molora, load_adapter, save_adapter
from molora_ds.modules import MoLoRALinear

__all__ = ["MoLoRAConfig", "MoLoRALinear", "apply_molora", "load_adapter", "save_adapter"]
