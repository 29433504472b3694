"""Linear + GELU (an MLP's fc1): vitfast (each backend) vs F.gelu(F.linear(...)), torch.compile of it and, on a GPU,
torch._addmm_activation (cuBLASLt's bias + GELU epilogue, tanh approximation only: timed for scale, not for equal
results), forward (no grad, vitfast's in-place path) and forward+backward. Shapes: ViT-B/16 fc1 (197 tokens x 768 ->
3072) and Swin-T's first-stage fc1 (3136 tokens x 96 -> 384), 64 images on a GPU, batch 1 and 8 on a CPU (Swin-T's
batch 8 is where the CPU choice fuses: a 38.5 MB output, integrations/choice.py)."""
import pytest
import torch
import torch.nn.functional as F

import vitfast

from conftest import ON_GPU, linear_cases, run_linear_benchmark, vitfast_backends

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BATCHES = (64,) if ON_GPU else (1, 8)
SHAPES = {"vit_b_fc1": (197, 768, 3072), "swin_t_s1_fc1": (3136, 96, 384)}
CASES = linear_cases(SHAPES, BATCHES, f"swin_t_s1_fc1 B={BATCHES[-1]}")
_compiled = torch.compile(lambda x, w, b: F.gelu(F.linear(x, w, b)))
IMPLS = vitfast_backends("linear_gelu") + ["torch", "torch.compile"] + (["torch._addmm_activation"] if ON_GPU else [])


def _fn(impl):
    if impl.startswith("vitfast"):
        return lambda x, w, b: vitfast.linear_gelu(x, w, b)
    if impl == "torch._addmm_activation":
        return lambda x, w, b: torch._addmm_activation(b, x, w.t(), use_gelu=True)
    if impl == "torch.compile":
        return _compiled
    return lambda x, w, b: F.gelu(F.linear(x, w, b))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_forward(benchmark, impl, case):
    run_linear_benchmark(benchmark, "linear_gelu", _fn(impl), impl, case, SHAPES, DTYPE, grad=False,
                         reference=_fn("torch"), outputs=2)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "torch._addmm_activation"])
@pytest.mark.parametrize("case", CASES)
def test_forward_backward(benchmark, impl, case):
    run_linear_benchmark(benchmark, "linear_gelu", _fn(impl), impl, case, SHAPES, DTYPE, grad=True,
                         reference=_fn("torch"))
