"""The batched layer and the preconditioner on CUDA agree with the float64 CPU computation."""

import pytest
import torch

from molora_ds.modules import MoLoRALinear
from molora_ds.optim.riemannian import precondition_

pytestmark = pytest.mark.gpu


def _layer(device, dtype, gate_rescale=True, compute="dense"):
    torch.manual_seed(0)
    layer = MoLoRALinear(
        torch.nn.Linear(256, 192), num_experts=20, rank=4, top_k=10, alpha=16.0, gate_rescale=gate_rescale,
        expert_compute=compute,
    )  # fmt: skip
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    return layer.to(device=device, dtype=dtype)


# sparse at r = 4 on CUDA: the CSR kernels (grouped_mm needs bf16 with r >= 8: test_grouped_mm_on_cuda)
@pytest.mark.parametrize("compute", ["dense", "sparse"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("gate_rescale", [False, True])
def test_forward_backward_matches_cpu_float64(dtype, tol, gate_rescale, compute):
    ref, gpu = _layer("cpu", torch.float64, gate_rescale), _layer("cuda", dtype, gate_rescale, compute)
    x = torch.randn(3, 50, 256, dtype=torch.float64)
    outs = []
    for layer, xs in ((ref, x), (gpu, x.to("cuda", dtype))):
        xs.requires_grad_(True)
        y = layer(xs)
        (y.float() ** 2).sum().backward()
        outs.append(
            [
                t.detach().cpu().double()
                for t in (y, xs.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad)
            ]
        )
    for want, got in zip(*outs):
        assert (got - want).norm() <= tol * want.norm() + 1e-6


def test_preconditioner_on_cuda_matches_cpu():
    torch.manual_seed(0)
    a, b = torch.randn(20, 4, 256), torch.randn(20, 192, 4) * 0.01
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    a_gpu, b_gpu = a.cuda(), b.cuda()
    a_gpu.grad, b_gpu.grad = a.grad.cuda(), b.grad.cuda()
    precondition_(a, b, 1e-6)
    precondition_(a_gpu, b_gpu, 1e-6)
    torch.testing.assert_close(a_gpu.grad.cpu(), a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b_gpu.grad.cpu(), b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gate_rescale", [False, True])
def test_grouped_mm_on_cuda(gate_rescale):
    """bf16, r = 8: the layer's sparse compute takes grouped_mm on CUDA; against float64 on CPU."""
    from molora_ds.modules.sparse import grouped_fits

    layers = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.bfloat16)):
        torch.manual_seed(0)
        layer = MoLoRALinear(torch.nn.Linear(256, 192), num_experts=32, rank=8, top_k=4, alpha=16.0,
                             gate_rescale=gate_rescale, expert_compute="sparse")  # fmt: skip
        torch.nn.init.normal_(layer.lora_B, std=0.02)
        layers.append(layer.to(device=device, dtype=dtype))
    gpu = layers[1]
    assert grouped_fits(torch.empty(1, 256, device="cuda", dtype=torch.bfloat16), gpu.lora_A, gpu.lora_B)
    x = torch.randn(3, 50, 256, dtype=torch.float64)
    outs = []
    for layer, xs in ((layers[0], x), (gpu, x.to("cuda", torch.bfloat16))):
        xs.requires_grad_(True)
        y = layer(xs)
        (y.float() ** 2).sum().backward()
        outs.append([t.detach().cpu().double() for t in (y, xs.grad, layer.lora_A.grad, layer.lora_B.grad)])
    for want, got in zip(*outs):
        assert (got - want).norm() <= 3e-2 * want.norm() + 1e-6
