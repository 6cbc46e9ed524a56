"""Recipes: YAML files naming the model, data, MoLoRA and optimizer settings of a run.

Loaded into typed dataclasses and validated before any model is built; ``--set a.b=v``
overrides any key (the value is parsed as YAML). Unknown keys are errors, not ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from molora_ds.config import MoLoRAConfig
from molora_ds.optim import OptimConfig


@dataclass
class DataConfig:
    name: str = "bigbench/social_iqa"
    eval_size: int = 300
    max_len: int = 256


@dataclass
class TrainConfig:
    """``global_batch`` is the logical batch of one optimizer step, whatever the process count.

    The per-process micro-batch is the largest divisor of ``global_batch / world`` not above
    ``max_micro_batch`` (unless the DeepSpeed config fixes it); accumulation makes up the rest.
    ``decay_steps`` defaults to ``max_steps / 0.9``: the lr ends at 10% of its start (the paper's schedule).
    """

    global_batch: int = 16
    max_micro_batch: int = 8
    max_steps: int = 100
    warmup_steps: int = 0
    decay_steps: int | None = None
    seed: int = 0
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 2
    max_bad_steps: int = 10


@dataclass
class EvalConfig:
    method: str = "loglik"
    before: bool = True
    after: bool = True
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.method not in ("loglik", "generate"):
            raise ValueError(f"eval.method must be 'loglik' or 'generate', got {self.method!r}")


@dataclass
class Recipe:
    model: str = "smollm2-135m"
    data: DataConfig = field(default_factory=DataConfig)
    molora: MoLoRAConfig = field(default_factory=MoLoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"molora": self.molora.to_dict()}


_SECTIONS = {"data": DataConfig, "molora": MoLoRAConfig, "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig}


def _set_dotted(d: dict, key: str, value: object) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"--set {key}: {p!r} is not a section")
    d[leaf] = value


def _build(cls: type, values: dict, where: str) -> object:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown} in {where}; known: {sorted(names)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"recipe: bad {where}: {e}") from e


def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    """The recipe at ``path`` (default: the embedded default) with ``key=value`` overrides applied."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} not found; pass --recipe with a YAML file (see recipes/)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"recipe {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set molora.top_k=4")
        _set_dotted(raw, key, yaml.safe_load(value))
    unknown = sorted(set(raw) - set(_SECTIONS) - {"model"})
    if unknown:
        raise ValueError(f"recipe: unknown section(s) {unknown}; known: {sorted([*_SECTIONS, 'model'])}")
    kwargs = {"model": raw.get("model", Recipe.model)}
    for name, cls in _SECTIONS.items():
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ValueError(f"recipe: section {name!r} must be a mapping, got {section!r}")
        kwargs[name] = _build(cls, section, name)
    recipe = Recipe(**kwargs)
    if recipe.molora.gate_rescale != recipe.optim.gate_rescale:
        if "gate_rescale" in raw.get("molora", {}):
            raise ValueError(
                f"recipe: molora.gate_rescale={recipe.molora.gate_rescale} contradicts optim.method="
                f"{recipe.optim.method!r}; the g-methods (grsgd, gradamw) imply gate_rescale=True, the others False"
            )
        recipe.molora.gate_rescale = recipe.optim.gate_rescale
    return recipe
