"""Recipes: YAML files naming the model, data, MoLoRA and optimizer settings of a run.

Loaded into typed dataclasses and validated before any model is built; ``--set a.b=v``
overrides any key (the value is parsed as YAML). Unknown keys and values of the wrong type are
errors, not ignored. Numbers for float fields may be written ``1e-3``: YAML 1.1 reads that as a
string (it wants ``1.0e-3``), so float fields convert numeric strings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from molora_ds.config import MoLoRAConfig
from molora_ds.optim import OptimConfig

DTYPES = ("float32", "bfloat16", "float16", "auto")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


@dataclass(frozen=True)  # hashable: a value that names a model
class ModelConfig:
    """The model to adapt: a built-in name (``smollm2-135m``, ``tiny-llama``), a local folder written by
    ``save_pretrained``, or a hub id. A recipe may give just that string (``model: /data/glm-4-9b-hf``).

    ``dtype`` is the dtype the weights load in (``auto``: the one in config.json); DeepSpeed's bf16
    setting still decides the training dtype. ``attn_implementation`` ``None`` keeps transformers' default.
    """

    name_or_path: str = "smollm2-135m"
    dtype: str = "float32"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    revision: str | None = None

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("model.name_or_path is empty; name a built-in model, a folder or a hub id")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.attn_implementation not in (None, *ATTN_IMPLEMENTATIONS):
            raise ValueError(
                f"model.attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)} or null, "
                f"got {self.attn_implementation!r}"
            )


BUILTIN_DATA = ("rotten_tomatoes", "easy_vqa", "bigbench/")
PROMPTS = ("lettered", "paper")


@dataclass
class DataConfig:
    """Where the multiple-choice rows come from and how they are prompted.

    ``format`` names the schema (``molora_ds.data.formats``); ``rotten_tomatoes`` and
    ``bigbench/<task>`` and ``easy_vqa`` (images) are built in and read no file, every other format reads ``train`` (a jsonl,
    json, csv or parquet file, a ``save_to_disk`` folder, or a hub id) and, if given, ``eval``
    (else ``eval_size`` rows of ``train`` are held out). ``columns`` maps our column names to
    yours for format ``mc``. ``prompt``: ``lettered`` (answer with a letter, scored by
    log-likelihood) or ``paper`` (the paper's Alpaca-style instruction, target "The answer is X.").
    ``max_len`` counts every token of a sequence, a vision-language model's image tokens included;
    ``image_workers`` DataLoader processes decode a run's images (0: the training process does).
    Recipes written before ``format`` existed name it ``name``; that key still loads.
    """

    format: str = "bigbench/social_iqa"
    train: str | None = None
    eval: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    eval_size: int = 300
    max_len: int = 256
    prompt: str = "lettered"
    image_workers: int = 2

    def __post_init__(self) -> None:
        if self.image_workers < 0:
            raise ValueError(f"data.image_workers must be >= 0, got {self.image_workers}")
        if self.eval_size < 1 or self.max_len < 1:
            raise ValueError(
                f"data.eval_size and data.max_len must be >= 1, got {self.eval_size}, {self.max_len}"
            )
        if self.prompt not in PROMPTS:
            raise ValueError(f"data.prompt must be one of {list(PROMPTS)}, got {self.prompt!r}")
        builtin = self.format.startswith(BUILTIN_DATA)
        if builtin and (self.train or self.eval):
            raise ValueError(
                f"data.format {self.format!r} is built in and reads no file; drop data.train/eval"
            )
        if not builtin and not self.train:
            raise ValueError(f"data.format {self.format!r} needs data.train: a data file, folder or hub id")
        if self.columns and self.format != "mc":
            raise ValueError(f"data.columns applies to format 'mc' only, not {self.format!r}")

    @property
    def name(self) -> str:
        """The built-in data set's name, as recipes called ``format`` before it existed."""
        return self.format


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

    def __post_init__(self) -> None:
        # Checked here, not where they are used: a 0 would otherwise surface after the model has
        # loaded, as a ZeroDivisionError in the training loop.
        positive = ("global_batch", "max_micro_batch", "max_steps", "log_every", "save_every", "keep_last")
        for name in (*positive, "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"train.decay_steps={self.decay_steps} must be greater than train.warmup_steps={self.warmup_steps}"
            )


@dataclass
class EvalConfig:
    method: str = "loglik"
    before: bool = True
    after: bool = True
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.method not in ("loglik", "generate"):
            raise ValueError(f"eval.method must be 'loglik' or 'generate', got {self.method!r}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    molora: MoLoRAConfig = field(default_factory=MoLoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"molora": self.molora.to_dict()}


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "molora": MoLoRAConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def _set_dotted(d: dict, key: str, value: object) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"--set {key}: {p!r} is not a section")
    d[leaf] = value


def _describe(hint: object) -> str:
    return str(hint).replace("typing.", "") if typing.get_args(hint) else getattr(hint, "__name__", str(hint))


def _convert(value: object, hint: object, key: str) -> object:
    """``value`` as the field type ``hint`` wants it, or a ValueError naming the key."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in options:
        origin, args = typing.get_origin(t) or t, typing.get_args(t)
        if t is type(None) and value is None:
            return None
        if t is float and isinstance(value, int | float | str) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (bool, str) and isinstance(value, t):
            return value
        if origin is dict and isinstance(value, dict):
            return value
        if origin in (list, tuple) and isinstance(value, list | tuple):
            if origin is tuple and args and Ellipsis not in args and len(args) != len(value):
                continue
            fixed = origin is tuple and Ellipsis not in args
            kinds = args if fixed else [args[0] if args else object] * len(value)
            try:
                items = [v if k is object else _convert(v, k, key) for v, k in zip(value, kinds)]
            except ValueError:
                continue
            return origin(items)
    raise ValueError(f"recipe: {key} must be {_describe(hint)}, got {value!r}")


def _build(cls: type, values: dict, where: str) -> object:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown} in {where}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"recipe: bad {where}: {e}") from e


def _expand_model(raw: dict) -> None:
    """The shorthand ``model: <name or path>`` as the mapping it stands for."""
    model = raw.get("model", {})
    if isinstance(model, str):
        raw["model"] = {"name_or_path": model}
    elif not isinstance(model, dict):
        raise ValueError(
            f"recipe: model must be str, got {model!r}; give a built-in name, a folder or a hub id, "
            "or a mapping with name_or_path"
        )


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
    if isinstance(raw.get("model"), str):  # so that --set model.dtype=... applies to the shorthand too
        raw["model"] = {"name_or_path": raw["model"]}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set molora.top_k=4")
        _set_dotted(raw, key, yaml.safe_load(value))
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"recipe: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    _expand_model(raw)
    data = raw.get("data")
    if isinstance(data, dict) and "name" in data:  # recipes from before data.format
        if "format" in data:
            raise ValueError("recipe: data.name is the old spelling of data.format; give one of them")
        data["format"] = data.pop("name")
    kwargs = {}
    for name, cls in _SECTIONS.items():
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ValueError(f"recipe: section {name!r} must be a mapping, got {section!r}")
        kwargs[name] = _build(cls, section, name)
    recipe = Recipe(**kwargs)
    if recipe.data.prompt == "paper" and recipe.eval.method != "generate":
        raise ValueError(
            "recipe: data.prompt=paper is scored by generation (the reply 'The answer is X.'); set eval.method=generate"
        )
    if recipe.molora.gate_rescale != recipe.optim.gate_rescale:
        if "gate_rescale" in raw.get("molora", {}):
            raise ValueError(
                f"recipe: molora.gate_rescale={recipe.molora.gate_rescale} contradicts optim.gate_rescale="
                f"{recipe.optim.gate_rescale} (optimizer {recipe.optim.name!r}); set optim.gate_rescale, "
                "or drop molora.gate_rescale: it follows the optimizer"
            )
        recipe.molora.gate_rescale = recipe.optim.gate_rescale
    return recipe
