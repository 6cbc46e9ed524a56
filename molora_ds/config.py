"""Typed, self-validating configuration for MoLoRA adapters."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field


@dataclass
class MoLoRAConfig:
    """Mixture of low-rank experts on frozen ``nn.Linear`` layers (DESIGN.md section 1).

    ``target_modules``: a list matches module names exactly or by dotted suffix, a string is a
    regex that must match the whole name (PEFT's rules). ``None`` picks the model family's default.
    ``layer_experts``: MoLA-style per-layer expert counts; the layers are split into
    ``len(layer_experts)`` contiguous groups, e.g. ``[2, 4, 6, 8]`` for the four quarters.
    ``expert_compute``: ``auto`` | ``dense`` | ``sparse`` (only the top_k selected experts per token;
    ``auto`` picks by the cost rule of ``molora_ds.modules.sparse.use_sparse``).
    ``expert_parallel_size``: shard each layer's experts over this many ranks (DeepSpeed's expert-parallel
    groups, ``molora_ds.distributed.expert_parallel``); it must divide every expert count.
    ``expert_parallel_mode``: ``auto`` | ``gather`` (all-gather the layer's experts, in the forward and again in
    the backward's recomputation, reduce-scatter their gradients) | ``dispatch`` (all-to-all the selected
    (token, expert) pairs to the experts' ranks and back);
    ``auto`` picks per layer by the cost model of ``expert_parallel.dispatch_wins``.
    """

    num_experts: int = 20
    rank: int = 4
    top_k: int = 10
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    gate_rescale: bool = True
    layer_experts: list[int] | None = None
    load_balance_coef: float = 0.0
    include_vision: bool = False
    expert_compute: str = "auto"
    expert_parallel_size: int = 1
    expert_parallel_mode: str = "auto"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.extra:
            raise ValueError(
                f"MoLoRAConfig: unknown keys {sorted(self.extra)}; known: {sorted(self.field_names())}"
            )
        if self.rank < 1:
            raise ValueError(f"MoLoRAConfig: rank must be >= 1, got {self.rank}")
        if self.layer_experts is not None and not self.layer_experts:
            raise ValueError(
                "MoLoRAConfig: layer_experts is an empty list; give one count per layer group or use None"
            )
        counts = self.layer_experts or [self.num_experts]
        if min(counts) < 1:
            raise ValueError(f"MoLoRAConfig: expert counts must be >= 1, got {counts}")
        if not 1 <= self.top_k <= min(counts):
            raise ValueError(
                f"MoLoRAConfig: top_k={self.top_k} must be between 1 and the smallest expert count "
                f"({min(counts)}); lower top_k or raise num_experts/layer_experts"
            )
        if self.top_k == 1 and max(counts) > 1 and not self.load_balance_coef:
            warnings.warn(
                "MoLoRAConfig: top_k=1 renormalises every gate to 1, so the task loss gives the router no "
                "gradient; use top_k >= 2 or set load_balance_coef > 0",
                stacklevel=3,
            )
        if not 0.0 < self.alpha < float("inf"):
            raise ValueError(f"MoLoRAConfig: alpha must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoLoRAConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.load_balance_coef < 0:
            raise ValueError(f"MoLoRAConfig: load_balance_coef must be >= 0, got {self.load_balance_coef}")
        if self.expert_compute not in ("auto", "dense", "sparse"):
            raise ValueError(
                f"MoLoRAConfig: expert_compute={self.expert_compute!r}; choose 'auto', 'dense' or 'sparse'"
            )
        if self.expert_parallel_size < 1:
            raise ValueError(
                f"MoLoRAConfig: expert_parallel_size must be >= 1, got {self.expert_parallel_size}"
            )
        if self.expert_parallel_mode not in ("auto", "gather", "dispatch"):
            raise ValueError(
                f"MoLoRAConfig: expert_parallel_mode={self.expert_parallel_mode!r}; choose 'auto', 'gather' or "
                "'dispatch'"
            )
        uneven = [c for c in counts if c % self.expert_parallel_size]
        if uneven:
            raise ValueError(
                f"MoLoRAConfig: expert_parallel_size={self.expert_parallel_size} does not divide the expert "
                f"count {uneven[0]}; choose a divisor of every expert count"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError(
                "MoLoRAConfig: target_modules is an empty list; name at least one module or use None"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls, d: dict) -> MoLoRAConfig:
        known = {k: v for k, v in d.items() if k in cls.field_names()}
        return cls(**known, extra={k: v for k, v in d.items() if k not in cls.field_names()})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d
