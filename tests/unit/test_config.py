"""MoLoRAConfig: bad values fail at construction with a message that says what to change."""

from __future__ import annotations

import re

import pytest

from molora_ds import MoLoRAConfig
from molora_ds.distributed.expert_parallel import dispatch_wins


def test_paper_defaults():
    cfg = MoLoRAConfig()
    assert (cfg.num_experts, cfg.rank, cfg.top_k, cfg.alpha, cfg.dropout) == (20, 4, 10, 16.0, 0.05)
    assert cfg.gate_rescale is True and cfg.target_modules is None
    assert cfg.scaling == 16.0 / 4


def test_dict_round_trip():
    cfg = MoLoRAConfig(num_experts=8, rank=2, top_k=3, target_modules=r".*\.q_proj", layer_experts=[4, 8])
    d = cfg.to_dict()
    assert "extra" not in d and d["layer_experts"] == [4, 8]
    assert MoLoRAConfig.from_dict(d) == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_experts": 4, "top_k": 5},
            "top_k=5 must be between 1 and the smallest expert count (4); lower top_k or raise num_experts",
        ),
        ({"num_experts": 4, "top_k": 0}, "top_k=0 must be between 1 and the smallest expert count (4)"),
        (
            {"num_experts": 20, "top_k": 3, "layer_experts": [2, 4, 6, 8]},
            "top_k=3 must be between 1 and the smallest expert count (2); lower top_k or raise num_experts/layer_experts",
        ),
        ({"layer_experts": [0, 4], "top_k": 1}, "expert counts must be >= 1, got [0, 4]"),
        ({"num_experts": 0, "top_k": 1}, "expert counts must be >= 1, got [0]"),
        ({"rank": 0}, "rank must be >= 1, got 0"),
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"dropout": -0.1}, "dropout must be in [0, 1), got -0.1"),
        ({"load_balance_coef": -1.0}, "load_balance_coef must be >= 0, got -1.0"),
        ({"target_modules": []}, "target_modules is an empty list; name at least one module or use None"),
    ],
)
def test_invalid_values_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MoLoRAConfig(**kwargs)


def test_unknown_keys_from_dict_are_named_with_the_known_ones():
    with pytest.raises(ValueError, match=re.escape("unknown keys ['lora_rank', 'topk']; known: [")) as err:
        MoLoRAConfig.from_dict({"num_experts": 4, "top_k": 2, "lora_rank": 8, "topk": 2})
    for known in ("rank", "top_k", "num_experts", "target_modules"):
        assert f"'{known}'" in str(err.value)
    assert "'extra'" not in str(err.value)


def test_from_dict_accepts_known_keys_only():
    cfg = MoLoRAConfig.from_dict({"num_experts": 4, "top_k": 2, "rank": 8})
    assert (cfg.num_experts, cfg.top_k, cfg.rank) == (4, 2, 8)


@pytest.mark.parametrize("kwargs", [{"num_experts": 3, "top_k": 3}, {"top_k": 2, "layer_experts": [2, 8]}])
def test_boundary_values_are_valid(kwargs):
    MoLoRAConfig(**kwargs)
    MoLoRAConfig(rank=1, dropout=0.0, target_modules=["q_proj"], **kwargs)


def test_expert_parallel_mode_and_its_cost_rule():
    with pytest.raises(
        ValueError, match="expert_parallel_mode='tokens'; choose 'auto', 'gather' or 'dispatch'"
    ):
        MoLoRAConfig(expert_parallel_mode="tokens")
    # dispatch below T* = 1.5*E*r/min(k, ep) tokens per rank, 2*E*r/min(k, ep) where the gradient reduction
    # is an all-reduce (bench/bench_ep_comm.py: 768 and 1024 at E=256, r=4, top-8, ep=2)
    assert dispatch_wins(256, 4, 8, 767, 2) and not dispatch_wins(256, 4, 8, 768, 2)
    assert dispatch_wins(256, 4, 8, 1023, 2, reduce_scatter=False)
    assert not dispatch_wins(256, 4, 8, 1024, 2, reduce_scatter=False)
    assert dispatch_wins(256, 4, 8, 191, 8) and not dispatch_wins(
        256, 4, 8, 192, 8
    )  # ep >= k: k rows a token
