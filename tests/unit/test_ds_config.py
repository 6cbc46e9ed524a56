"""The DeepSpeed key tables of molora_ds.ds_config against DeepSpeed itself (issue 9.8: a misspelt key
was ignored, or failed only after the model had loaded). If a DeepSpeed upgrade reads new keys, these fail
and say which to add."""

from __future__ import annotations

import re

import pytest

from molora_ds.ds_config import TOP_LEVEL_KEYS, ZERO_KEYS, load_ds_config


class _Recording(dict):
    """A config dict that records every key DeepSpeed looks up in it."""

    seen: set[str] = set()

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)


def test_every_top_level_key_deepspeed_reads_is_accepted():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = _Recording(train_batch_size=8, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4)
    DeepSpeedConfig(cfg)
    assert len(cfg.seen) > 40  # the recording worked
    assert cfg.seen <= TOP_LEVEL_KEYS, f"add to TOP_LEVEL_KEYS: {sorted(cfg.seen - TOP_LEVEL_KEYS)}"


def test_zero_keys_are_deepspeeds_fields_and_aliases():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    assert DeepSpeedZeroConfig.model_config.get("extra") == "forbid"  # why an unknown key fails later
    assert {f.alias or n for n, f in fields.items()} | set(fields) == ZERO_KEYS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"zero_optimization": {"stage": 2}, "gradient_clip": 1.0}', "unknown key(s) ['gradient_clip']"),
        (
            '{"zero_optimization": {"stage": 3, "stage3_prefetch": 1}}',
            "['stage3_prefetch'] in zero_optimization",
        ),
        ('{"zero_optimization": {"stage": true}}', "stage must be 0, 1, 2 or 3, got True"),
        ('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}', "none, cpu or nvme"),
        ('{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}', "sets no nvme_path"),
    ],
)
def test_bad_deepspeed_configs_name_the_key(tmp_path, text, message):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_ds_config(path)


def test_nvme_offload_with_a_path_is_accepted(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        '{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}}'
    )
    assert load_ds_config(path)["zero_optimization"]["offload_param"]["nvme_path"] == "/x"
