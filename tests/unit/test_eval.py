"""mc_accuracy against a one-question-at-a-time reference, answer parsing, and sharded evaluation."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import concatenate_datasets

from molora_ds.data.multiple_choice import encode_prompts, format_prompt, load_mc
from molora_ds.eval import _pad, extract_choice, generate_replies, logits_at, mc_accuracy
from molora_ds.models.loading import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def mixed():
    """Rows with 2, 3 and 4 choices and prompts of different lengths, so batches need padding."""
    parts = [
        load_mc("bigbench/social_iqa").select(range(5)),
        load_mc("bigbench/strategyqa").select(range(4)),
        load_mc("bigbench/goal_step_wikihow/goal_inference").select(range(4)),
    ]
    return concatenate_datasets(parts).shuffle(seed=0)


def reference_predictions(model, tokenizer, ds) -> list[int]:
    """Each question alone, unpadded: argmax over its choices' letter logits after the prompt."""
    letter_ids = [tokenizer.convert_tokens_to_ids("Ġ" + letter) for letter in "ABCD"]
    preds = []
    with torch.no_grad():
        for row in ds:
            ids = tokenizer(format_prompt(row["question"], row["choices"]), return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, -1]
            preds.append(int(logits[letter_ids[: len(row["choices"])]].argmax()))
    return preds


def test_loglik_matches_unpadded_reference(tiny, mixed):
    model, tokenizer = tiny
    model.eval()
    preds = reference_predictions(model, tokenizer, mixed)
    assert len(set(preds)) > 1, "a model that always picks one letter would make this test weak"
    expected = [int(p == g) for p, g in zip(preds, mixed["answer_index"])]
    # Accuracy on every prefix recovers which rows mc_accuracy got right, not just how many.
    correct_so_far = [0]
    for k in range(1, len(mixed) + 1):
        result = mc_accuracy(model, tokenizer, mixed, batch_size=4, limit=k)
        assert result["n"] == k
        correct_so_far.append(round(result["accuracy"] * k))
    got = [b - a for a, b in zip(correct_so_far, correct_so_far[1:])]
    assert got == expected


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: logits_at must slice the full logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_logits_at_equals_full_logits(tiny):
    model, _ = tiny
    model.eval()
    gen = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 1000, (3, 9), generator=gen),
        "attention_mask": torch.ones(3, 9, dtype=torch.long),
    }
    batch["attention_mask"][1, 6:] = 0
    positions = torch.tensor([0, 4, 5, 8])
    with torch.no_grad():
        full = model(**batch).logits
        for m in (model, NoLogitsToKeep(model)):
            got = logits_at(m, batch, positions)
            assert got.shape == (3, 4, full.shape[-1])
            torch.testing.assert_close(got, full[:, positions], rtol=1e-5, atol=1e-5)


def test_restores_each_module_mode(tiny, mixed):
    model, tokenizer = tiny
    model.train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    mc_accuracy(model, tokenizer, mixed, limit=2)
    assert [m.training for m in model.modules()] == modes
    model.eval()


def test_generate_batched_replies_equal_unpadded_ones(tiny, mixed):
    """Left-padded batches generate, token for token, what each prompt generates alone."""
    model, tokenizer = tiny
    model.eval()
    prompts = encode_prompts(mixed, tokenizer, 1024)
    alone = [
        generate_replies(model, tokenizer, _pad([p], 0, left=True, device=torch.device("cpu")), pad_id=0)[0]
        for p in prompts
    ]
    batched = generate_replies(
        model, tokenizer, _pad(prompts, 0, left=True, device=torch.device("cpu")), pad_id=0
    )
    assert len({len(p) for p in prompts}) > 1, "prompts of one length would need no padding"
    assert batched == alone
    assert mc_accuracy(model, tokenizer, mixed, method="generate", batch_size=4)["n"] == len(mixed)


@pytest.mark.parametrize(
    "reply, n_choices, expected",
    [
        (" B", 3, 1),
        (" C.\nQuestion: next", 3, 2),
        ("(A) because it is", 3, 0),
        ("The answer is B.", 3, 1),
        ("I think the answer: C", 4, 2),
        ("The answer is a person who", 3, None),
        (" D", 3, None),  # not one of the choices
        ("I don't know", 3, None),
        ("", 2, None),
        (" Both are fine", 2, None),
    ],
)
def test_extract_choice(reply, n_choices, expected):
    assert extract_choice(reply, n_choices) == expected


def test_bad_input_raises(tiny, mixed):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="answer_index"):
        mc_accuracy(model, tokenizer, mixed.remove_columns("answer_index"))
    with pytest.raises(ValueError, match="loglik"):
        mc_accuracy(model, tokenizer, mixed, method="logprob")


WORKER = """
import json, os, sys
import torch.distributed as dist
from datasets import concatenate_datasets
from molora_ds.data.multiple_choice import load_mc
from molora_ds.eval import mc_accuracy
from molora_ds.models.loading import load_model

dist.init_process_group("gloo")
model, tokenizer = load_model("tiny-llama")
ds = load_mc("bigbench/social_iqa").select(range(9))  # 9 rows: uneven shards of 5 and 4
result = mc_accuracy(model, tokenizer, ds, batch_size=2)
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_sharded_result_equals_single_process(tiny, tmp_path):
    model, tokenizer = tiny
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(script),
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, timeout=300)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = mc_accuracy(model, tokenizer, load_mc("bigbench/social_iqa").select(range(9)), batch_size=2)
    assert results == [expected, expected]
