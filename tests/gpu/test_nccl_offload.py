"""What a first cluster job exercises: the tiny recipe in bf16 under ZeRO-2/3 on one GPU, and over NCCL
with optimizer offload.

Each rank must sit on cuda:LOCAL_RANK (not all on cuda:0), the router-group norm of the
offloaded (CPU) gradients must all-reduce over NCCL, and a 2-rank run must equal the same
micro-batches on 1 GPU (test_zero_parity's argument: same kernels, one addition of two
gradients either way), up to fp32 noise in the partitioned norms.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.launching import check_ok, free_port, metrics, run

pytestmark = pytest.mark.gpu

TINY = ["--recipe", "recipes/tiny.yaml", "--set", "eval.before=false", "--set", "eval.after=false",
        "--set", "molora.dropout=0.0", "--set", "train.global_batch=4", "--set", "train.max_steps=4"]  # fmt: skip


def _train(tmp_path, nproc: int, config: str, micro: int) -> list[dict]:
    out = tmp_path / f"{nproc}gpu"
    cmd = ["torchrun", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "launch/train.py", "--config", config, "--output-dir", str(out),
           *TINY, "--set", f"train.max_micro_batch={micro}"]  # fmt: skip
    text = check_ok(run(cmd))
    assert "bf16" in text and f"{nproc} processes" in text
    return metrics(out)


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a GPU")
@pytest.mark.parametrize(
    "config",
    [
        "ds_configs/zero2.json",
        "ds_configs/zero3.json",
        "ds_configs/zero2_offload.json",
        "ds_configs/zero3_offload.json",
    ],
)
def test_tiny_recipe_bf16_on_one_gpu(tmp_path, config):
    """The tiny recipe trains in bf16 under ZeRO-2 and ZeRO-3, with and without optimizer offload."""
    rows = _train(tmp_path, 1, config, 2)
    assert all(r["skipped"] == 0 and r["grad_norm/router"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("config", ["ds_configs/zero2_offload.json", "ds_configs/zero3_offload.json"])
def test_two_ranks_over_nccl_equal_one_gpu(tmp_path, config):
    two, one = _train(tmp_path / "a", 2, config, 2), _train(tmp_path / "b", 1, config, 2)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-6)
    for key in ("grad_norm/experts", "grad_norm/router"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5)
    print(json.dumps(two[-1]))
