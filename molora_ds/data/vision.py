"""Images for vision-language models (LLaVA): where a row's image is, the chat template around its prompt,
the processor's image-token expansion, and the DataLoader whose workers build each step's micro-batches.

A row's image is a reference ``{"bytes": ..., "path": ...}`` (the storage of ``datasets.Image(decode=False)``):
rows stay small, and an image is decoded only when a batch needs it, in a DataLoader worker.

Prompts go through the model's chat template (LLaVA-1.5: ``USER: <image>\\n<prompt> ASSISTANT:``). The
processor replaces the one ``<image>`` by one token per image patch (576 for LLaVA-1.5's 336 px, 14 px
patches); ``VisionPrompt`` does the same expansion on token ids, with the count measured once on the
processor itself, so that tokenisation needs no image and its result can be cached. Those image tokens
count toward ``data.max_len``; they and the prompt are masked out of the loss.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from PIL import Image, UnidentifiedImageError

from molora_ds.data.multiple_choice import pad_collate

# llava-hf's LLaVA-1.5 template, used when a processor ships none.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_SENTINEL = "\x00PROMPT\x00"


def image_ref(value: object, base: Path | None) -> dict[str, object] | None:
    """A row's image as ``{"bytes", "path"}``: a path (relative ones against ``base``), bytes, or datasets' dict."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return {"bytes": value, "path": None}
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, str) and value:
        data, path = None, value
    else:
        raise ValueError(f"image {value!r:.80} is neither a file path nor image bytes")
    if data is None and base is not None and not Path(path).expanduser().is_absolute():
        path = str(base / path)
    return {"bytes": data, "path": path}


def open_image(ref: dict[str, object], where: str, load: bool = True) -> Image.Image:
    """The RGB image of a reference (``load=False``: its header only); a one-line error names ``where`` and the file."""
    name = ref["path"] or "<image bytes>"
    try:
        image = Image.open(io.BytesIO(ref["bytes"]) if ref["bytes"] else Path(ref["path"]).expanduser())
        return image.convert("RGB") if load else image
    except UnidentifiedImageError:
        raise ValueError(f"{where}: image {name} cannot be opened (not an image format PIL reads)") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ValueError(f"{where}: image {name} cannot be opened ({reason})") from None


@dataclass(frozen=True)
class VisionPrompt:
    """A processor's chat template and image-token expansion, as plain values (hashed into the
    tokenisation cache's fingerprint): the text before and after a prompt with and without an image,
    the image token's id, and how many tokens the processor puts in its place."""

    image_wrap: tuple[str, str]
    text_wrap: tuple[str, str]
    image_token_id: int
    image_tokens: int

    def wrap(self, has_image: bool) -> tuple[str, str]:
        return self.image_wrap if has_image else self.text_wrap

    def expand(self, ids: list[int]) -> list[int]:
        """``ids`` with each image token repeated ``image_tokens`` times, as the processor does."""
        out = []
        for t in ids:
            out += [t] * self.image_tokens if t == self.image_token_id else [t]
        return out


def _render(processor, has_image: bool) -> tuple[str, str]:
    content = [{"type": "image"}] if has_image else []
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": _SENTINEL}]}]
    template = processor.chat_template or LLAVA_CHAT_TEMPLATE
    text = processor.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )
    before, _, after = text.partition(_SENTINEL)
    return before, after


def vision_prompt(processor) -> VisionPrompt:
    """The chat template and image-token count of a LLaVA-style processor, measured by running it once."""
    tokenizer = processor.tokenizer
    token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    size = processor.image_processor.crop_size or processor.image_processor.size
    blank = Image.new("RGB", (size.get("width", 32), size.get("height", 32)))
    ids = processor(text=[processor.image_token], images=[blank], return_tensors="pt")["input_ids"][0]
    return VisionPrompt(
        image_wrap=_render(processor, True),
        text_wrap=_render(processor, False),
        image_token_id=token_id,
        image_tokens=int((ids == token_id).sum()),
    )


def pixel_values(
    image_processor, refs: Sequence[dict | None], rows: Sequence[int], where: str
) -> torch.Tensor | None:
    """The processor's pixels of the rows that have an image, in row order (None if none has one):
    LLaVA matches them to the image tokens in that order. ``rows`` name the rows in errors."""
    images = [open_image(ref, f"{where} row {i}") for i, ref in zip(rows, refs) if ref is not None]
    if not images:
        return None
    return image_processor(images, return_tensors="pt")["pixel_values"]


@dataclass
class StepBatches(torch.utils.data.Dataset):
    """Item ``step``: this rank's micro-batches of global step ``step``, a slice of a per-epoch
    permutation. It depends on (seed, step) only, so a resumed run sees the same examples, and it
    is built (images decoded and through the processor) in DataLoader workers, off the training loop."""

    rows: Dataset  # tokenised: input_ids, labels (and image)
    global_batch: int
    micro: int
    accum: int
    world: int
    rank: int
    seed: int
    pad_id: int
    image_processor: object | None = None

    def indices(self, step: int) -> list[int]:
        g, n = self.global_batch, len(self.rows)
        start, idx = step * g, []
        while len(idx) < g:
            epoch, offset = divmod(start + len(idx), n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            idx += perm[offset : offset + g - len(idx)].tolist()
        return idx

    def __getitem__(self, step: int) -> list[dict[str, torch.Tensor]]:
        idx, out = self.indices(step), []
        for a in range(self.accum):
            first = (a * self.world + self.rank) * self.micro
            chosen = idx[first : first + self.micro]
            rows = self.rows.select(chosen)
            batch = pad_collate(rows, self.pad_id)
            if self.image_processor is not None:
                pixels = pixel_values(self.image_processor, rows["image"], chosen, "training set")
                if pixels is not None:
                    batch["pixel_values"] = pixels
            out.append(batch)
        return out


def step_loader(batches: StepBatches, start: int, workers: int) -> torch.utils.data.DataLoader:
    """Steps ``start, start + 1, ...`` of ``batches``, built ``workers`` processes ahead (0: in this one)."""
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,  # an item is already a step's list of micro-batches
        sampler=itertools.count(start),
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )
