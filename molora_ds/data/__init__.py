"""Data sets and prompt formats; assets (BIG-bench tasks) come from the offline cache."""

from molora_ds.data.multiple_choice import load_mc, load_mc_splits, pad_collate, tokenize_mc

__all__ = ["load_mc", "load_mc_splits", "pad_collate", "tokenize_mc"]
