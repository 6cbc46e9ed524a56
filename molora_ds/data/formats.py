"""One reader per published data-set schema, each giving the multiple-choice rows the trainer uses:
``question`` (str), ``choices`` (list[str]), ``answer_index`` (0-based int).

Schemas, as published on the Hugging Face hub (read from their dataset cards and loaders):

- ``mc`` (ours): ``question``, ``choices`` (a list, or its JSON text in a csv), ``answer`` (0-based
  index, or a letter A, B, ...). ``columns`` maps our names to yours: ``{question: stem}``.
- ``commonsense_qa`` (tau/commonsense_qa): ``question``, ``choices: {label: [A..E], text: [...]}``,
  ``answerKey`` (a label; empty on the test split).
- ``openbookqa`` (allenai/openbookqa, main): ``question_stem``, ``choices: {text, label}``, ``answerKey``.
- ``social_iqa`` (allenai/social_i_qa): ``context``, ``question``, ``answerA/B/C``, ``label``
  ("1".."3", 1-based, a string in the published files).
- ``science_qa`` (derek-thomas/ScienceQA): ``question``, ``choices`` (list), ``answer`` (0-based int),
  ``hint`` (context, often empty), ``image`` (null for text questions), plus lecture/solution/
  subject fields we do not read. The hint becomes a "Context:" line, as in the paper's code. A text
  model trains on the text questions (the paper's text experiments), a vision-language model on
  the image questions (``load_splits``).
- ``glue/<task>`` (nyu-mll/glue): the task's text columns and an integer ``label`` whose names become
  the choices (e.g. mnli: entailment, neutral, contradiction). stsb's label is a similarity score
  in [0, 5], rounded to the nearest integer, the choices being "0".."5". Test splits have label -1
  and are rejected.
- ``visual7w`` (the "telling" file ``dataset_v7w_telling.json`` of Zhu et al., the layout the paper's
  code reads): ``{"images": [{"filename", "image_id", "split", "qa_pairs": [{"qa_id", "question",
  "answer", "multiple_choices": [3 wrong answers], "type"}]}]}``. One file holds every split:
  ``data.train`` reads the "train" rows, ``data.eval`` the "val" rows. The answer and the three
  distractors are shuffled per question (seeded by ``qa_id``), since the file keeps them apart.
  Images are read from ``images/<filename>`` beside the file (how the two archives of the
  published download unpack).
- ``vmcbench`` (suyc21/VMCBench): ``index``, ``question``, ``A``, ``B``, ``C``, ``D``, ``answer`` (a
  letter), ``category``, ``image``.

Images (``science_qa``, ``visual7w``, ``vmcbench``, and ``mc``'s optional ``image``): a file path,
absolute or relative to the data file's folder, or image bytes as ``datasets`` stores them. Rows keep
a reference (``{"bytes", "path"}``, see ``molora_ds.data.vision``); each image's header is read here,
so that one that cannot be opened fails before the model loads, naming the row and the file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
from datasets import Dataset, DatasetDict, Features, Image, List, Value, load_dataset, load_from_disk

from molora_ds.data.multiple_choice import encode_prompts, load_mc_splits, tokenize_mc
from molora_ds.data.vision import VisionPrompt, image_ref, open_image
from molora_ds.recipe import BUILTIN_DATA, DataConfig

if TYPE_CHECKING:  # transformers loads only with a model
    from transformers import PreTrainedTokenizerBase

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_COLUMNS = ("question", "choices", "answer_index")

Row = dict[str, object]
# A row's (question, choices, answer index), or None to skip the row.
Converter = Callable[[Row], tuple[str, list[str], int] | None]


@dataclass(frozen=True)
class Format:
    columns: tuple[str, ...]  # what the published schema must have
    convert: Converter
    image: str | None = None  # the column of the row's image, where the schema has one (optional)


def _index_of(answer: object, labels: list[str]) -> int:
    if str(answer) not in labels:
        raise ValueError(f"answer {answer!r} is not one of the choice labels {labels}")
    return labels.index(str(answer))


def _labelled(question_key: str) -> Converter:
    """CommonsenseQA and OpenBookQA: choices as {label, text}, the answer a label."""

    def convert(row: Row) -> tuple[str, list[str], int]:
        choices = row["choices"]
        return row[question_key], list(choices["text"]), _index_of(row["answerKey"], list(choices["label"]))

    return convert


def _social_iqa(row: Row) -> tuple[str, list[str], int]:
    label = str(row["label"]).strip()
    if not label.isdigit():
        raise ValueError(f"label {row['label']!r} is not 1, 2 or 3")
    return (
        f"{row['context']} {row['question']}",
        [row["answerA"], row["answerB"], row["answerC"]],
        int(label) - 1,
    )


def _science_qa(row: Row) -> tuple[str, list[str], int]:
    question = f"Context: {row['hint']}\n{row['question']}" if row["hint"] else row["question"]
    return question, list(row["choices"]), int(row["answer"])


def _vmcbench(row: Row) -> tuple[str, list[str], int]:
    return row["question"], [row[k] for k in "ABCD"], _index_of(row["answer"], list("ABCD"))


def _mc(row: Row) -> tuple[str, list[str], int]:
    choices = row["choices"]
    if isinstance(choices, str):  # a csv cell holds the list's JSON text
        choices = json.loads(choices)
    answer = row["answer"]
    if isinstance(answer, str) and not answer.strip().isdigit():
        return row["question"], list(choices), _index_of(answer.strip(), list(LETTERS[: len(choices)]))
    return row["question"], list(choices), int(answer)


GLUE_TASKS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "cola": (("sentence",), ["unacceptable", "acceptable"]),
    "sst2": (("sentence",), ["negative", "positive"]),
    "mrpc": (("sentence1", "sentence2"), ["not equivalent", "equivalent"]),
    "qqp": (("question1", "question2"), ["not duplicate", "duplicate"]),
    "stsb": (("sentence1", "sentence2"), ["0", "1", "2", "3", "4", "5"]),
    "mnli": (("premise", "hypothesis"), ["entailment", "neutral", "contradiction"]),
    "qnli": (("question", "sentence"), ["entailment", "not entailment"]),
    "rte": (("sentence1", "sentence2"), ["entailment", "not entailment"]),
    "wnli": (("sentence1", "sentence2"), ["not entailment", "entailment"]),
}


def _glue(task: str) -> Format:
    text_columns, names = GLUE_TASKS[task]

    def convert(row: Row) -> tuple[str, list[str], int]:
        label = row["label"]
        if label == -1:
            raise ValueError("label -1: GLUE test splits have no labels; use the train or validation split")
        index = round(label) if task == "stsb" else int(label)
        text = "\n".join(f"{c.capitalize()}: {row[c]}" for c in text_columns)
        return f"{text}\nWhich label fits ({task})?", names, index

    return Format((*text_columns, "label"), convert)


FORMATS: dict[str, Format] = {
    "mc": Format(("question", "choices", "answer"), _mc, image="image"),
    "commonsense_qa": Format(("question", "choices", "answerKey"), _labelled("question")),
    "openbookqa": Format(("question_stem", "choices", "answerKey"), _labelled("question_stem")),
    "social_iqa": Format(("context", "question", "answerA", "answerB", "answerC", "label"), _social_iqa),
    "science_qa": Format(("question", "choices", "answer", "hint"), _science_qa, image="image"),
    "vmcbench": Format(("question", "A", "B", "C", "D", "answer"), _vmcbench, image="image"),
    "visual7w": Format(("question", "choices", "answer"), _mc, image="image"),  # see _visual7w_rows
    **{f"glue/{t}": _glue(t) for t in GLUE_TASKS},
}
_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_HUB_SPLITS = {"train": "train", "eval": "validation"}


def _cache_dir(path: Path) -> str | None:
    """datasets' cache beside the data, so a re-run (any user) reuses the converted rows."""
    cache = path.parent / ".molora_ds_cache"
    try:
        cache.mkdir(exist_ok=True)
    except OSError:
        return None  # a read-only data folder: datasets' default cache
    return str(cache)


def read_table(source: str, role: str) -> Dataset:
    """Rows of a jsonl/json/csv/parquet file, a ``save_to_disk`` folder, or a hub id (split train/validation)."""
    path = Path(source).expanduser()
    if path.is_dir():
        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            raise ValueError(
                f"{path} holds splits {list(ds)}; point data.{role} at one of them ({path}/<split>)"
            )
        return ds
    if path.is_file():
        kind = _SUFFIXES.get("".join(path.suffixes[-1:]).lower())
        if kind is None:
            raise ValueError(
                f"data file {path}: unknown type; use .jsonl, .json, .csv, .parquet or a datasets folder"
            )
        return load_dataset(kind, data_files=str(path), split="train", cache_dir=_cache_dir(path))
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"data.{role}: {path} does not exist")
    try:
        return load_dataset(source, split=_HUB_SPLITS[role])
    except (OSError, ConnectionError, ValueError) as e:
        raise ValueError(
            f"data.{role}: {source!r} is not a local file or folder and cannot be loaded from the hub "
            f"({type(e).__name__}); download it and point data.{role} at the file"
        ) from e


def _visual7w_rows(source: str, role: str) -> Dataset:
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"data.{role}: {path} does not exist (visual7w reads dataset_v7w_telling.json)"
        )
    try:
        images = json.loads(path.read_text())["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a Visual7W telling file ({{'images': [...]}}): {e}") from e
    split = {"train": "train", "eval": "val"}[role]
    rows: dict[str, list] = {"question": [], "choices": [], "answer": [], "image": []}
    for image in images:
        if image["split"] != split:
            continue
        for qa in image["qa_pairs"]:
            choices = [*qa["multiple_choices"], qa["answer"]]
            random.Random(qa["qa_id"]).shuffle(choices)
            rows["image"].append(str(path.parent / "images" / image["filename"]))
            rows["question"].append(qa["question"])
            rows["choices"].append(choices)
            rows["answer"].append(choices.index(qa["answer"]))
    return Dataset.from_dict(rows)


def _convert_batch(
    batch: dict[str, list], indices: list[int], fmt: Format, where: str, base: Path | None, images: bool
) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in (*MC_COLUMNS, "image")[: len(MC_COLUMNS) + images]}
    checked: set[str] = set()  # many questions share an image: read each header once per batch
    for j, i in enumerate(indices):
        row = {k: v[j] for k, v in batch.items()}
        try:
            question, choices, answer = fmt.convert(row)
            image = image_ref(row.get(fmt.image), base) if images else None
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: row {i}: {e}") from None
        if not 0 <= answer < len(choices):
            raise ValueError(
                f"{where}: row {i}: answer index {answer} is out of range for {len(choices)} choices"
            )
        if image is not None and (image["bytes"] or image["path"] not in checked):
            open_image(image, f"{where}: row {i}", load=False).close()
            checked.add(image["path"])
        out["question"].append(question)
        out["choices"].append([str(c) for c in choices])
        out["answer_index"].append(answer)
        if images:
            out["image"].append(image)
    return out


def read_mc(format: str, source: str, role: str = "train", columns: dict[str, str] | None = None) -> Dataset:
    """The multiple-choice rows of ``source`` read in ``format``; a one-line ValueError on bad input.

    Rows have an ``image`` column (a reference, None for a text row) where the format has images."""
    if format not in FORMATS:
        raise ValueError(
            f"unknown data.format {format!r}; choose one of {sorted(FORMATS)}, rotten_tomatoes, bigbench/<task>"
        )
    fmt = FORMATS[format]
    raw = _visual7w_rows(source, role) if format == "visual7w" else read_table(source, role)
    where = f"data.{role} {source}"
    if columns:
        unknown = sorted(set(columns) - {*fmt.columns, fmt.image})
        if unknown:
            raise ValueError(
                f"data.columns: {unknown} are not ours; map {list(fmt.columns)} and image to your names"
            )
        raw = raw.rename_columns({theirs: ours for ours, theirs in columns.items() if theirs != ours})
    missing = [c for c in fmt.columns if c not in raw.column_names]
    if missing:
        hint = " (map yours with data.columns)" if format == "mc" else ""
        raise ValueError(f"{where}: format {format} needs columns {missing}, found {raw.column_names}{hint}")
    if len(raw) == 0:
        raise ValueError(f"{where} has no rows")
    images = fmt.image in raw.column_names
    if images and isinstance(raw.features[fmt.image], Image):
        raw = raw.cast_column(fmt.image, Image(decode=False))  # references, not decoded pictures
    path = Path(source).expanduser()
    base = path if path.is_dir() else path.parent if path.is_file() else None
    features = Features(
        {"question": Value("string"), "choices": List(Value("string")), "answer_index": Value("int64")}
        | ({"image": Image(decode=False)} if images else {})
    )
    return raw.map(
        _convert_batch,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=features,
        fn_kwargs={"fmt": fmt, "where": where, "base": base, "images": images},
        desc=f"reading {format}",
    )


def check_data(
    data: DataConfig,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    vision: VisionPrompt | None = None,
) -> None:
    """Read and split a recipe's data in full and, given the model's ``tokenizer`` (and ``vision``
    prompt, for a vision-language model), tokenise it as the run will: a bad row, an ``eval_size``
    the data cannot hold or a ``max_len`` a prompt cannot fit in fails before the model loads.

    Tokenised files are cached beside the data (``tokenize_mc``), so the run reuses the work; a
    built-in set is tokenised again (about a second). Progress bars are off, so that an error is the
    only line a user sees."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        train, evals = load_splits(data, seed, vision=None if tokenizer is None else vision is not None)
        if tokenizer is not None:
            tokenize_mc(train, tokenizer, data.max_len, data.prompt, vision)
            encode_prompts(evals, tokenizer, data.max_len, data.prompt, vision)
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def for_model(ds: Dataset, vision: bool | None, where: str) -> Dataset:
    """The rows a model trains on: a text model the rows without an image; a vision-language model the
    rows with one if there are any (every forward then runs the vision tower on every rank, which
    ZeRO-3's parameter gathering needs), else all rows, text only. ``None``: all rows (no model yet)."""
    if vision is None or "image" not in ds.column_names:
        return ds
    has_image = [ref is not None for ref in ds["image"]]
    if vision and not any(has_image):
        return ds.remove_columns("image")
    keep = [i for i, h in enumerate(has_image) if h == vision]
    if not keep:
        raise ValueError(
            f"{where}: every row has an image, but the model is a text model; "
            "use a vision-language model (LLaVA) or text data"
        )
    ds = ds.select(keep) if len(keep) < len(ds) else ds
    return ds if vision else ds.remove_columns("image")


def load_splits(data: DataConfig, seed: int = 0, vision: bool | None = False) -> tuple[Dataset, Dataset]:
    """(train, eval) rows of a recipe's data section for a text (or, ``vision``, a vision-language)
    model, see ``for_model``; eval holds at most ``eval_size`` rows."""
    if data.format.startswith(BUILTIN_DATA):
        train, evals = load_mc_splits(data.format, data.eval_size, seed)
        return for_model(train, vision, data.format), for_model(evals, vision, data.format)
    train = for_model(
        read_mc(data.format, data.train, "train", data.columns), vision, f"data.train {data.train}"
    )
    if data.eval:
        evals = for_model(
            read_mc(data.format, data.eval, "eval", data.columns), vision, f"data.eval {data.eval}"
        )
        if len(evals) > data.eval_size:
            evals = evals.shuffle(seed=seed).select(range(data.eval_size))
        return train, evals
    if not 0 < data.eval_size < len(train):
        raise ValueError(
            f"data.eval_size={data.eval_size} must be below the {len(train)} rows of {data.train}, or give data.eval"
        )
    held = train.train_test_split(test_size=data.eval_size, seed=seed, shuffle=True)
    return held["train"], held["test"]
