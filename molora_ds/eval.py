"""Multiple-choice accuracy of a causal LM, on one process or sharded over a distributed run.

``loglik`` reads the next-token logits after ``Answer:`` and picks the highest-scoring answer
letter among the question's choices: one forward per question, no parsing, the standard
zero-shot metric. ``generate`` lets the model write a short reply and parses a letter out of
it, which is what a user of the model would actually see.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Literal

import torch
import torch.distributed as dist
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from molora_ds.data.multiple_choice import LETTERS, check_mc_columns, encode_prompts, letter_token_ids
from molora_ds.data.vision import VisionPrompt, pixel_values

GENERATE_TOKENS = 8
# Only capital letters count: "the answer is a person ..." must not parse as A.
_ANSWER_IS = re.compile(r"(?i:answer)\s*(?:is|:)\s*\(?([A-Z])\b")
_LEADING = re.compile(r"^\s*\(?([A-Z])(?:[).:,]|\s|$)")


def extract_choice(text: str, n_choices: int) -> int | None:
    """The choice index named in a generated reply ("The answer is B", " B.", "(B) ..."), else None."""
    match = _ANSWER_IS.search(text) or _LEADING.match(text)
    if match is None:
        return None
    index = LETTERS.index(match.group(1))
    return index if index < n_choices else None


def _pad(prompts: list[list[int]], pad_id: int, left: bool, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        cols = slice(width - len(p), width) if left else slice(0, len(p))
        ids[row, cols] = torch.tensor(p)
        mask[row, cols] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def logits_at(model: nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """The logits at sequence ``positions`` (1-D, sorted, unique) of every row: ``[batch, len(positions), vocab]``.

    The vocabulary projection runs at those positions only where the model's forward takes
    ``logits_to_keep`` (Hugging Face causal LMs do): with a 49k vocabulary it would otherwise cost
    a fifth of a small model's step, and most of its activation memory, for logits nobody reads.
    """
    forward = getattr(model, "module", model).forward  # a DeepSpeed engine forwards to its module
    if "logits_to_keep" in inspect.signature(forward).parameters:
        return model(**batch, logits_to_keep=positions).logits
    return model(**batch).logits[:, positions]


def _loglik_choices(
    model: nn.Module, batch: dict[str, torch.Tensor], letters: torch.Tensor, n_choices: torch.Tensor
) -> torch.Tensor:
    mask = batch["attention_mask"]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(dim=1)  # last real token, whichever side the padding is on
    keep, column = last.unique(return_inverse=True)
    logits = logits_at(model, batch, keep)
    logprobs = logits[torch.arange(len(last), device=last.device), column].float().log_softmax(-1)
    scores = logprobs[:, letters]
    scores[torch.arange(len(letters), device=scores.device) >= n_choices[:, None]] = -math.inf
    return scores.argmax(dim=1)


def generate_replies(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: dict[str, torch.Tensor],
    pad_id: int,
    synced: bool = False,
) -> list[str]:
    """Greedy replies of ``GENERATE_TOKENS`` tokens to a left-padded batch of prompts."""
    out = model.generate(
        **batch,
        max_new_tokens=GENERATE_TOKENS,
        do_sample=False,
        pad_token_id=pad_id,
        synced_gpus=synced,  # ZeRO-3 ranks must keep stepping together until all are done
    )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def _generate_choices(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: dict[str, torch.Tensor],
    n_choices: torch.Tensor,
    pad_id: int,
    synced: bool,
) -> torch.Tensor:
    replies = generate_replies(model, tokenizer, batch, pad_id, synced)
    picks = [extract_choice(r, int(n)) for r, n in zip(replies, n_choices)]
    return torch.tensor([-1 if p is None else p for p in picks])


def _shard(n: int) -> tuple[list[int], list[bool]]:
    """This rank's row indices and which of them count, padded to the same length on every rank.

    Equal lengths mean every rank runs the same number of forwards, which ZeRO-3 needs (each
    forward all-gathers parameters); the padding rows repeat row 0 and are not counted.
    """
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    rows = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    return rows + [0] * (per_rank - len(rows)), [True] * len(rows) + [False] * (per_rank - len(rows))


@torch.no_grad()
def mc_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: Dataset,
    method: Literal["loglik", "generate"] = "loglik",
    batch_size: int = 16,
    max_len: int = 1024,
    limit: int | None = None,
    prompt: str = "lettered",
    vision: VisionPrompt | None = None,
    image_processor: object | None = None,
) -> dict[str, float | int]:
    """Accuracy on the first ``limit`` rows of a multiple-choice data set: ``{"accuracy", "n"}``.

    Takes any ``nn.Module`` with a Hugging Face causal-LM forward (a DeepSpeed engine's
    ``.module`` included). In a distributed run each rank scores a shard and the counts are
    summed, so every rank returns the same numbers. Prompts longer than ``max_len`` lose the
    start of their question, as in training. A vision-language model takes ``vision`` (its chat
    template and image tokens) and ``image_processor``: rows with an ``image`` are shown it.
    """
    if method not in ("loglik", "generate"):
        raise ValueError(f"method must be 'loglik' or 'generate', got {method!r}")
    check_mc_columns(ds)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise ValueError("cannot compute accuracy on an empty data set")
    rows, counted = _shard(len(ds))
    shard = ds.select(rows)
    prompts = encode_prompts(shard, tokenizer, max_len, prompt, vision)
    images = shard["image"] if image_processor is not None and "image" in shard.column_names else None
    cols = shard.select_columns(["choices", "answer_index"]).to_dict()
    n_choices = torch.tensor([len(c) for c in cols["choices"]])
    gold = torch.tensor(cols["answer_index"])
    device = next(model.parameters()).device
    letters = torch.tensor(letter_token_ids(tokenizer, int(n_choices.max())), device=device)
    synced = dist.is_initialized() and dist.get_world_size() > 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # Per module: a model may deliberately keep some submodules in eval mode while training.
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        picks = []
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            # loglik pads on the right; generation continues from the last column, so on the left
            batch = _pad(prompts[chunk], pad_id, left=method == "generate", device=device)
            if images is not None:
                pixels = pixel_values(image_processor, images[chunk], rows[chunk], "eval set")
                if pixels is not None:  # in the model's dtype: LLaVA does not cast them
                    batch["pixel_values"] = pixels.to(device, getattr(model, "dtype", torch.float32))
            if method == "loglik":
                picks.append(_loglik_choices(model, batch, letters, n_choices[chunk].to(device)).cpu())
            else:
                picks.append(_generate_choices(model, tokenizer, batch, n_choices[chunk], pad_id, synced))
    finally:
        for m, training in modes.items():
            m.training = training

    correct = ((torch.cat(picks) == gold) & torch.tensor(counted)).sum()
    totals = torch.stack([correct, torch.tensor(sum(counted))]).to(torch.float64)
    if dist.is_initialized():
        # NCCL only reduces GPU tensors; gloo takes CPU ones.
        totals = totals.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(totals)
    n_correct, n = (int(x) for x in totals.tolist())
    return {"accuracy": n_correct / n, "n": n}
