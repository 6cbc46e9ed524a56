"""Vision-language rows: the processor's own expansion against ours, loss masks, max_len with image
tokens, the step batches built in DataLoader workers, and evaluation with images, on the tiny LLaVA
(its processor: tests/unit/test_models.tiny_llava_processor) and real easy-VQA images."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, LlavaProcessor

from molora_ds.data.formats import check_data, load_splits
from molora_ds.data.multiple_choice import easy_vqa, format_prompt, tokenize_mc
from molora_ds.data.vision import LLAVA_CHAT_TEMPLATE, StepBatches, step_loader, vision_prompt
from molora_ds.eval import GENERATE_TOKENS, extract_choice, mc_accuracy
from molora_ds.models.loading import load_model, load_processor
from molora_ds.recipe import DataConfig, ModelConfig
from tests.unit.test_models import save_tiny, tiny_llava_processor


@pytest.fixture(scope="module")
def processor():
    return tiny_llava_processor()


@pytest.fixture(scope="module")
def rows():
    return easy_vqa()[0].select(range(0, 60, 5))  # 12 questions on 3 images


def _pil(ref: dict) -> Image.Image:
    return Image.open(ref["path"]).convert("RGB")


def test_llava_15_processor_gives_576_image_tokens():
    tokenizer = tiny_llava_processor().tokenizer
    clip336 = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(
        image_processor=clip336, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip
    vp = vision_prompt(processor)
    assert vp.image_tokens == 576  # (336 / 14)^2, LLaVA-1.5-7B's
    assert vp.image_wrap == ("USER: <image>\n", " ASSISTANT:")
    assert vp.text_wrap == ("USER: ", " ASSISTANT:")


def test_labels_mask_every_image_and_prompt_token_and_ids_match_the_processor(processor, rows):
    vp = vision_prompt(processor)
    tok = processor.tokenizer
    examples = tokenize_mc(rows, tok, max_len=128, vision=vp)
    for q, choices, answer, ref, ex in zip(
        rows["question"], rows["choices"], rows["answer_index"], rows["image"], examples
    ):
        text = f"USER: <image>\n{format_prompt(q, choices)} ASSISTANT:"
        # The processor expands <image> itself, from the real image.
        expected = processor(text=[text], images=[_pil(ref)], return_tensors="pt")["input_ids"][0].tolist()
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids[: len(expected)] == expected
        assert expected.count(vp.image_token_id) == ids.count(vp.image_token_id) == 16
        # Everything but the reply (the answer letter and eos) is masked: every image token included.
        reply = ids[len(expected) :]
        assert (
            tok.decode(reply)
            == f" {'AB'[answer] if len(choices) == 2 else 'ABCDEFGH'[answer]}{tok.eos_token}"
        )
        assert labels == [-100] * len(expected) + reply


def test_image_tokens_count_toward_max_len(processor, rows):
    vp = vision_prompt(processor)
    full = tokenize_mc(rows, processor.tokenizer, max_len=128, vision=vp)
    longest = max(len(ids) for ids in full["input_ids"])
    cut = tokenize_mc(rows, processor.tokenizer, max_len=longest - 2, vision=vp)
    assert max(len(ids) for ids in cut["input_ids"]) == longest - 2
    assert all(ids.count(vp.image_token_id) == 16 for ids in cut["input_ids"])  # the question lost tokens
    with pytest.raises(
        ValueError,
        match=r"data.max_len=20 is too short: a prompt needs \d+ tokens even without its question",
    ):
        tokenize_mc(rows, processor.tokenizer, max_len=20, vision=vp)


def test_step_batches_from_workers_equal_in_process_and_hold_the_processors_pixels(processor, rows):
    vp = vision_prompt(processor)
    examples = tokenize_mc(rows, processor.tokenizer, max_len=128, vision=vp)
    batches = StepBatches(examples, 4, 2, 1, 2, 1, 7, 0, processor.image_processor)
    by_workers = list(itertools.islice(step_loader(batches, 5, workers=2), 3))  # a resume at step 5
    for step, got in zip(range(5, 8), by_workers):
        idx = batches.indices(step)
        assert idx == StepBatches(examples, 4, 2, 1, 2, 0, 7, 0).indices(step)  # same order on every rank
        (batch,) = got
        assert torch.equal(batch["input_ids"], batches[step][0]["input_ids"])
        mine = idx[2:4]  # rank 1's half of the global batch
        expected = processor.image_processor([_pil(examples[i]["image"]) for i in mine], return_tensors="pt")[
            "pixel_values"
        ]
        assert torch.equal(batch["pixel_values"], expected)


def test_bad_image_names_row_and_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    ok = {"question": "q", "choices": ["a", "b"], "answer": 0}
    for image, reason in [
        ("missing.png", "No such file or directory"),
        ("broken.png", "not an image format PIL reads"),
    ]:
        path = tmp_path / f"{image}.jsonl"
        path.write_text(json.dumps(ok) + "\n" + json.dumps(ok | {"image": image}) + "\n")
        with pytest.raises(ValueError) as info:
            check_data(DataConfig(format="mc", train=str(path), eval=str(path)))
        assert (
            str(info.value)
            == f"data.train {path}: row 1: image {tmp_path / image} cannot be opened ({reason})"
        )


def test_a_text_model_keeps_text_rows_and_a_vision_model_image_rows(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"question": f"q{i}", "choices": ["a", "b"], "answer": 0, "image": "a.png" if i % 2 else None}
        for i in range(6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(format="mc", train=str(path), eval=str(path))
    text_train, _ = load_splits(cfg, vision=False)
    assert text_train["question"] == ["q0", "q2", "q4"] and "image" not in text_train.column_names
    vl_train, _ = load_splits(cfg, vision=True)
    assert vl_train["question"] == ["q1", "q3", "q5"]
    assert vl_train["image"][0]["path"] == str(tmp_path / "a.png")  # relative to the data file
    only_images = tmp_path / "images.jsonl"
    only_images.write_text("".join(json.dumps(r) + "\n" for r in rows if r["image"]))
    with pytest.raises(ValueError, match="every row has an image, but the model is a text model"):
        load_splits(DataConfig(format="mc", train=str(only_images), eval=str(only_images)), vision=False)


@torch.no_grad()
def test_loglik_and_generate_accuracy_use_the_images(tmp_path, rows):
    folder = save_tiny("llava", tmp_path / "llava")
    cfg = ModelConfig(name_or_path=str(folder))
    model, tok = load_model(cfg)
    processor = load_processor(cfg)
    model.eval()
    vp = vision_prompt(processor)
    # Reference: one question at a time through the processor, the letter scored after "ASSISTANT:".
    letters = [tok(f"Answer: {L}", add_special_tokens=False)["input_ids"][-1] for L in "ABCDEFGH"]
    right, generated = [], []
    for q, choices, answer, ref in zip(
        rows["question"], rows["choices"], rows["answer_index"], rows["image"]
    ):
        text = f"USER: <image>\n{format_prompt(q, choices)} ASSISTANT:"
        inputs = processor(text=[text], images=[_pil(ref)], return_tensors="pt")
        logits = model(**inputs).logits[0, -1]
        right.append(int(logits[letters[: len(choices)]].argmax()) == answer)
        out = model.generate(
            **inputs, max_new_tokens=GENERATE_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
        )
        reply = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        generated.append(extract_choice(reply, len(choices)) == answer)
    got = [
        mc_accuracy(
            model, tok, rows, "loglik", 4, 128, limit=k, vision=vp, image_processor=processor.image_processor
        )
        for k in range(1, len(rows) + 1)
    ]
    # Accuracy on every prefix recovers which rows were right, not just how many.
    assert [round(g["accuracy"] * g["n"]) for g in got] == list(itertools.accumulate(right))
    gen = [
        mc_accuracy(
            model,
            tok,
            rows,
            "generate",
            4,
            128,
            limit=k,
            vision=vp,
            image_processor=processor.image_processor,
        )
        for k in range(1, len(rows) + 1)
    ]  # batched and left-padded, against each question alone
    assert [round(g["accuracy"] * g["n"]) for g in gen] == list(itertools.accumulate(generated))
