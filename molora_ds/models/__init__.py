"""Per-model loading recipes."""

from molora_ds.models.loading import load_model, load_smollm2, tiny_llama

__all__ = ["load_model", "load_smollm2", "tiny_llama"]
