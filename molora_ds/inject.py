"""Put MoLoRA adapters into a model: target matching, injection, freezing, adapter files."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from molora_ds.config import MoLoRAConfig
from molora_ds.modules import MoLoRALinear

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_ATTN_QV = ["q_proj", "v_proj"]
# Default targets per `config.model_type`: the paper adapts the attention query and value projections.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "llama": _ATTN_QV,
    "mistral": _ATTN_QV,
    "qwen2": _ATTN_QV,
    "glm": _ATTN_QV,
    "glm4": _ATTN_QV,
    "bert": ["query", "value"],
    "llava": r".*language_model\..*\.(q_proj|v_proj)",
}
_LLAVA_WITH_VISION = r".*(language_model|vision_tower)\..*\.(q_proj|v_proj)"


def default_targets(model: nn.Module, include_vision: bool = False) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "llava" and include_vision:
        return _LLAVA_WITH_VISION
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default MoLoRA targets for model_type={model_type!r}; set target_modules "
            f"(known defaults: {sorted(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]


def matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex over the full name; a list matches exactly or by dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _layer_index(name: str) -> int | None:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def _experts_per_module(names: list[str], cfg: MoLoRAConfig) -> dict[str, int]:
    """MoLA: split the numbered layers into len(layer_experts) contiguous groups."""
    if not cfg.layer_experts:
        return dict.fromkeys(names, cfg.num_experts)
    indices = {n: _layer_index(n) for n in names}
    if None in indices.values():
        unnumbered = [n for n, i in indices.items() if i is None]
        raise ValueError(
            f"layer_experts needs numbered layers, but these targets have no index: {unnumbered[:3]}"
        )
    num_layers = max(indices.values()) + 1
    groups = len(cfg.layer_experts)
    return {n: cfg.layer_experts[i * groups // num_layers] for n, i in indices.items()}


def find_targets(model: nn.Module, cfg: MoLoRAConfig) -> dict[str, int]:
    """The names of the ``nn.Linear`` layers ``cfg`` targets, each with its expert count.

    Raises a one-line ``ValueError`` if nothing matches, a match is not a Linear, or
    ``layer_experts`` cannot apply. It reads names and types only, so a model built on the meta
    device (no weights) answers the same as the loaded one.
    """
    targets = (
        cfg.target_modules if cfg.target_modules is not None else default_targets(model, cfg.include_vision)
    )
    found = [(n, m) for n, m in model.named_modules() if n and matches(n, targets)]
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"target_modules={targets!r} matched no module; Linear layers include {linears[:6]}")
    wrong = [(n, type(m).__name__) for n, m in found if type(m) is not nn.Linear]
    if wrong:
        raise ValueError(
            f"target_modules={targets!r} matched non-Linear modules {wrong[:3]}; narrow the targets"
        )
    return _experts_per_module([n for n, _ in found], cfg)


def apply_molora(model: nn.Module, cfg: MoLoRAConfig) -> list[str]:
    """Replace every targeted ``nn.Linear`` with a ``MoLoRALinear`` in place; freeze everything else.

    Returns the replaced module names. Raises ``ValueError`` as ``find_targets`` does, before
    touching the model.
    """
    experts = find_targets(model, cfg)
    model.requires_grad_(False)
    for name in experts:
        linear = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        layer = MoLoRALinear(
            linear,
            num_experts=experts[name],
            rank=cfg.rank,
            top_k=cfg.top_k,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            gate_rescale=cfg.gate_rescale,
            load_balance_coef=cfg.load_balance_coef,
            expert_compute=cfg.expert_compute,
        )
        setattr(model.get_submodule(parent_name), child, layer)
    trainable, total = count_parameters(model)
    log.info(
        "MoLoRA: %d layers, %s trainable of %s parameters (%.3f%%)",
        len(experts),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return list(experts)


def molora_layers(model: nn.Module) -> dict[str, MoLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoLoRALinear)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); ZeRO-3 partitioned parameters count with their full size (``ds_numel``)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, t in sizes if t), sum(n for n, _ in sizes)


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the layers' load-balancing losses from the last forward (None when they are off)."""
    losses = [m.aux_loss for m in molora_layers(model).values() if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (experts and routers) by their names in ``model``."""
    return {
        f"{prefix}.{n}": p.detach()
        for prefix, layer in molora_layers(model).items()
        for n, p in layer.named_parameters()
        if not n.startswith("base_layer.")
    }


def save_adapter(path: str | Path, state: dict[str, torch.Tensor], cfg: MoLoRAConfig) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``path`` (atomically per file)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (ADAPTER_WEIGHTS + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp), metadata={"format": "molora_ds"})
    tmp.replace(path / ADAPTER_WEIGHTS)
    tmp = path / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
    tmp.replace(path / ADAPTER_CONFIG)


def load_adapter(model: nn.Module, path: str | Path) -> MoLoRAConfig:
    """Inject (if needed) and load an adapter saved by ``save_adapter``; any mismatch raises ``ValueError``."""
    path = Path(path)
    for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (path / f).is_file():
            raise FileNotFoundError(
                f"{path / f} not found: is {path} an adapter folder written by save_adapter?"
            )
    cfg = MoLoRAConfig.from_dict(json.loads((path / ADAPTER_CONFIG).read_text()))
    if not molora_layers(model):
        apply_molora(model, cfg)
    state = load_file(str(path / ADAPTER_WEIGHTS))  # safetensors: no pickle, safe on untrusted files
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"adapter {path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    _check_layers_match(model, cfg, path)
    bad = [
        (k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"adapter {path} shape mismatch (name, file, model): {bad[:3]}")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(state[k])
    return cfg


def _check_layers_match(model: nn.Module, cfg: MoLoRAConfig, path: Path) -> None:
    """The already-injected layers must be the ones the adapter was trained with, not just the same shapes.

    top_k, alpha and gate_rescale leave the tensors' shapes alone, so a mismatch would load silently
    and compute another function than the one trained.
    """
    layers = molora_layers(model)
    experts = _experts_per_module(list(layers), cfg)
    for name, m in layers.items():
        # (field, the file's value, the layer's value, equal); a layer keeps alpha only as alpha / rank
        checks = [
            ("num_experts", experts[name], m.num_experts, experts[name] == m.num_experts),
            ("rank", cfg.rank, m.rank, cfg.rank == m.rank),
            ("top_k", cfg.top_k, m.top_k, cfg.top_k == m.top_k),
            ("alpha", cfg.alpha, m.scaling * m.rank, cfg.scaling == m.scaling),
            ("gate_rescale", cfg.gate_rescale, m.gate_rescale, cfg.gate_rescale == m.gate_rescale),
        ]
        for field, want, have, equal in checks:
            if not equal:
                raise ValueError(
                    f"adapter {path} has {field}={want}, but the model's layer {name} has {field}={have}: "
                    "load it into a model without adapters, or inject with the adapter's config"
                )
