"""Each reader on a fixture in its data set's published schema (tests/fixtures/formats, written by
hand, content invented), the expected rows written out here; bad input fails in one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from datasets import Dataset

from molora_ds.data.formats import check_data, load_splits, read_mc
from molora_ds.data.multiple_choice import format_prompt, tokenize_mc
from molora_ds.models.loading import smollm2_tokenizer
from molora_ds.recipe import DataConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "formats"


@pytest.fixture
def data(tmp_path) -> Path:
    """A copy of the fixtures: reading caches beside the data, which must not land in the repo."""
    return Path(shutil.copytree(FIXTURES, tmp_path / "formats"))


EXPECTED = {
    ("commonsense_qa", "commonsense_qa.jsonl"): [
        ("Where would you put a cup after washing it?", ["cupboard", "oven", "garden", "car", "bed"], 0),
        ("What do people use to cut paper?", ["spoon", "scissors", "pillow", "lamp", "sock"], 1),
    ],
    ("openbookqa", "openbookqa.jsonl"): [
        ("Plants need what to make food?", ["rocks", "sunlight", "plastic", "metal"], 1),
        ("Ice melting is an example of", ["freezing", "condensing", "a phase change", "erosion"], 2),
    ],
    ("social_iqa", "social_iqa.jsonl"): [
        (
            "Sam lent Alex a pen during the exam. How would Alex feel as a result?",
            ["grateful", "angry", "bored"],
            0,
        ),
        (
            "Kim stayed up all night studying. What will Kim want to do next?",
            ["run a race", "eat glass", "get some sleep"],
            2,
        ),
    ],  # fmt: skip
    ("science_qa", "science_qa.jsonl"): [  # the image question too (a text model drops it: test_vision)
        ("Which is a mammal?", ["shark", "dolphin", "trout"], 1),
        ("Context: It was summer in the desert.\nWhich word fits the context?", ["hot", "cold"], 0),
        ("Which state is highlighted?", ["Ohio", "Utah"], 1),
    ],
    ("glue/mnli", "glue_mnli.jsonl"): [
        (
            "Premise: A man is playing a guitar.\nHypothesis: A man plays music.\nWhich label fits (mnli)?",
            ["entailment", "neutral", "contradiction"],
            0,
        ),
        (
            "Premise: The cat sleeps.\nHypothesis: The cat is running.\nWhich label fits (mnli)?",
            ["entailment", "neutral", "contradiction"],
            2,
        ),
    ],  # fmt: skip
    ("glue/sst2", "glue_sst2.csv"): [
        ("Sentence: a gorgeous film\nWhich label fits (sst2)?", ["negative", "positive"], 1),
        ("Sentence: dull and long\nWhich label fits (sst2)?", ["negative", "positive"], 0),
    ],
    ("glue/stsb", "glue_stsb.jsonl"): [  # the 0-5 score rounded
        ("Sentence1: A dog runs.\nSentence2: A dog is running.\nWhich label fits (stsb)?", list("012345"), 5),
        ("Sentence1: A man cooks.\nSentence2: A plane lands.\nWhich label fits (stsb)?", list("012345"), 0),
    ],
    # the other six GLUE tasks: their text columns and label names (nyu-mll/glue's ClassLabel names, "_" as " ")
    ("glue/cola", "glue_cola.jsonl"): [
        ("Sentence: The book was read by her.\nWhich label fits (cola)?", ["unacceptable", "acceptable"], 1),
        ("Sentence: Book the her read was.\nWhich label fits (cola)?", ["unacceptable", "acceptable"], 0),
    ],
    ("glue/mrpc", "glue_mrpc.jsonl"): [
        (
            "Sentence1: He left at noon.\nSentence2: At noon he departed.\nWhich label fits (mrpc)?",
            ["not equivalent", "equivalent"],
            1,
        ),
        (
            "Sentence1: Rain fell all day.\nSentence2: Prices rose sharply.\nWhich label fits (mrpc)?",
            ["not equivalent", "equivalent"],
            0,
        ),
    ],
    ("glue/qqp", "glue_qqp.jsonl"): [
        (
            "Question1: How do I boil an egg?\nQuestion2: What is the way to boil an egg?\nWhich label fits (qqp)?",
            ["not duplicate", "duplicate"],
            1,
        ),
        (
            "Question1: Why is the sky blue?\nQuestion2: Who wrote Hamlet?\nWhich label fits (qqp)?",
            ["not duplicate", "duplicate"],
            0,
        ),
    ],
    ("glue/qnli", "glue_qnli.jsonl"): [
        (
            "Question: Where is the Eiffel Tower?\nSentence: The Eiffel Tower stands in Paris.\nWhich label fits (qnli)?",
            ["entailment", "not entailment"],
            0,
        ),
        (
            "Question: When was the bridge built?\nSentence: The river is wide.\nWhich label fits (qnli)?",
            ["entailment", "not entailment"],
            1,
        ),
    ],
    ("glue/rte", "glue_rte.jsonl"): [
        (
            "Sentence1: Anna bought a red car.\nSentence2: Anna owns a car.\nWhich label fits (rte)?",
            ["entailment", "not entailment"],
            0,
        ),
        (
            "Sentence1: Tom sleeps.\nSentence2: Tom is running a race.\nWhich label fits (rte)?",
            ["entailment", "not entailment"],
            1,
        ),
    ],
    ("glue/wnli", "glue_wnli.jsonl"): [
        (
            "Sentence1: The trophy did not fit in the case because it was too big.\nSentence2: The trophy was too big."
            "\nWhich label fits (wnli)?",
            ["not entailment", "entailment"],
            1,
        ),
        (
            "Sentence1: The trophy did not fit in the case because it was too big.\nSentence2: The case was too big."
            "\nWhich label fits (wnli)?",
            ["not entailment", "entailment"],
            0,
        ),
    ],  # fmt: skip
    ("vmcbench", "vmcbench.jsonl"): [
        ("What is shown in the image?", ["a cat", "a car", "a tree", "a boat"], 2),
        ("How many people are there?", ["1", "2", "3", "4"], 1),
    ],
    ("mc", "mc.jsonl"): [("2 + 2 = ?", ["3", "4", "5"], 1), ("Capital of France?", ["Rome", "Paris"], 1)],
}


def rows(ds: Dataset) -> list[tuple]:
    return list(zip(ds["question"], ds["choices"], ds["answer_index"]))


@pytest.mark.parametrize(("format", "file"), list(EXPECTED), ids=[f for f, _ in EXPECTED])
def test_reader_gives_the_expected_rows(format, file, data):
    assert rows(read_mc(format, str(data / file))) == EXPECTED[format, file]


def test_all_file_kinds_and_a_saved_folder_read_the_same(data):
    expected = EXPECTED["mc", "mc.jsonl"]
    Dataset.from_json(str(data / "mc.jsonl")).to_parquet(str(data / "mc.parquet"))
    Dataset.from_json(str(data / "mc.jsonl")).save_to_disk(str(data / "mc_saved"))
    for source in ("mc.parquet", "mc_saved"):
        assert rows(read_mc("mc", str(data / source))) == expected, source


def test_mc_columns_map_other_names(data):
    ds = read_mc(
        "mc",
        str(data / "mc_renamed.csv"),
        columns={"question": "stem", "choices": "options", "answer": "gold"},
    )
    assert rows(ds) == [("Pick the even number", ["3", "8"], 1)]


def test_visual7w_splits_and_shuffles_the_answer_in(data):
    source = str(data / "visual7w_telling.json")
    (q, choices, answer), = rows(read_mc("visual7w", source, "train"))  # fmt: skip
    assert q == "What color is the bus?" and sorted(choices) == ["Blue.", "Green.", "Red.", "White."]
    assert choices[answer] == "Red."
    assert rows(read_mc("visual7w", source, "train")) == [(q, choices, answer)]  # the same order each time
    (q, choices, answer), = rows(read_mc("visual7w", source, "eval"))  # fmt: skip
    assert q == "Where is the dog?" and choices[answer] == "On the sofa."
    assert read_mc("visual7w", source, "eval")["image"] == [
        {"bytes": None, "path": str(data / "images" / "v7w_2.jpg")}
    ]


def test_held_out_eval_and_separate_eval(data):
    train, evals = load_splits(
        DataConfig(format="commonsense_qa", train=str(data / "commonsense_qa.jsonl"), eval_size=1)
    )
    assert len(train) == len(evals) == 1 and set(train["question"]) != set(evals["question"])
    train, evals = load_splits(
        DataConfig(
            format="openbookqa", train=str(data / "openbookqa.jsonl"), eval=str(data / "openbookqa.jsonl")
        )
    )
    assert len(train) == len(evals) == 2


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_input_is_one_line(data, tmp_path):
    ok = {"question": "q", "choices": ["a", "b"], "answer": 0}
    cases = [
        (DataConfig(format="mc", train=str(tmp_path / "none.jsonl")), "none.jsonl does not exist"),
        (
            DataConfig(format="commonsense_qa", train=str(data / "openbookqa.jsonl")),
            "format commonsense_qa needs columns ['question'], found ['id', 'question_stem', 'choices', 'answerKey']",
        ),
        (DataConfig(format="mc", train=_write(tmp_path / "r.jsonl", [ok, ok | {"answer": 2}])),
         "row 1: answer index 2 is out of range for 2 choices"),
        (DataConfig(format="mc", train=_write(tmp_path / "l.jsonl", [ok, ok | {"answer": "C"}])),
         "row 1: answer 'C' is not one of the choice labels ['A', 'B']"),
        (DataConfig(format="social_iqa", train=_write(tmp_path / "s.jsonl", [
            {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "4"}])),
         "row 0: answer index 3 is out of range for 3 choices"),
        (DataConfig(format="glue/rte", train=_write(tmp_path / "g.jsonl", [
            {"sentence1": "a", "sentence2": "b", "label": -1, "idx": 0}])), "GLUE test splits have no labels"),
        (DataConfig(format="squad", train=str(data / "mc.jsonl")), "unknown data.format 'squad'"),
        (DataConfig(format="mc", train="someone/some-data"), "cannot be loaded from the hub"),
    ]  # fmt: skip
    for cfg, message in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            check_data(cfg)
        text = str(info.value)
        assert message in text and "\n" not in text, (message, text)


def test_paper_prompt_and_target():
    assert format_prompt("Which is red?", ["grass", "blood"], "paper").endswith(
        "### Instruction:\nQuestion: Which is red?\nOptions: (A) grass (B) blood\n\n### Response:\n"
    )
    tok = smollm2_tokenizer()
    ds = Dataset.from_dict(
        {"question": ["Which is red?"], "choices": [["grass", "blood"]], "answer_index": [1]}
    )
    ex = tokenize_mc(ds, tok, max_len=128, prompt="paper")[0]
    target = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
    assert tok.decode(target) == "The answer is B." + tok.eos_token
    assert (
        tok.decode(ex["input_ids"])
        == format_prompt("Which is red?", ["grass", "blood"], "paper") + "The answer is B." + tok.eos_token
    )
    assert re.search(r"The answer is ([A-Z])\.", tok.decode(target)).group(1) == "B"  # the paper's regex


def test_tokenised_set_is_cached_beside_the_data_and_reused(data):
    tok = smollm2_tokenizer()

    def tokenised() -> Dataset:
        return tokenize_mc(read_mc("commonsense_qa", str(data / "commonsense_qa.jsonl")), tok, max_len=64)

    first = tokenised()
    files = [Path(f["filename"]) for f in first.cache_files]
    assert files and all(data / ".molora_ds_cache" in f.parents for f in files), files
    stamps = {f: f.stat().st_mtime_ns for f in files}
    second = tokenised()
    assert [
        Path(f["filename"]) for f in second.cache_files
    ] == files  # same fingerprint: reused, not rewritten
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert second["input_ids"] == first["input_ids"]
    assert (
        tokenize_mc(
            read_mc("commonsense_qa", str(data / "commonsense_qa.jsonl")), tok, max_len=48
        ).cache_files
        != first.cache_files
    )


def test_parallel_tokenisation_gives_the_same_rows(data, monkeypatch):
    from molora_ds.data import multiple_choice

    tok = smollm2_tokenizer()
    ds = read_mc("commonsense_qa", str(data / "commonsense_qa.jsonl"))
    one = tokenize_mc(ds, tok, max_len=64)
    monkeypatch.setattr(multiple_choice, "PARALLEL_TOKENIZE_ROWS", 2)  # 2 rows: 2 worker processes
    monkeypatch.setattr(multiple_choice.os, "cpu_count", lambda: 2)
    several = tokenize_mc(ds, tok, max_len=64)
    assert several.to_dict() == one.to_dict()
