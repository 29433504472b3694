"""Linear layers (qkv, proj, fc2 of the models): vitfast.linear (each backend that runs here: oneDNN on a CPU) vs
F.linear (MKL's sgemm on an x86-64 CPU, cuBLAS on a GPU) and torch.compile of it, forward (no grad) and
forward+backward. Shapes: ViT-B/16's qkv (197 tokens x 768 -> 2304) and fc2 (197 x 3072 -> 768) and Swin-T's
first-stage qkv (3136 x 96 -> 288), 64 images on a GPU, batch 1 and 8 on a CPU."""
import pytest
import torch
import torch.nn.functional as F

import vitfast

from conftest import ON_GPU, linear_cases, run_linear_benchmark, vitfast_backends

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BATCHES = (64,) if ON_GPU else (1, 8)
SHAPES = {"vit_b_qkv": (197, 768, 2304), "vit_b_fc2": (197, 3072, 768), "swin_t_s1_qkv": (3136, 96, 288)}
CASES = linear_cases(SHAPES, BATCHES, f"vit_b_qkv B={BATCHES[-1]}")
_compiled = torch.compile(F.linear)
IMPLS = vitfast_backends("linear") + ["torch", "torch.compile"]


def _fn(impl):
    if impl.startswith("vitfast"):
        return vitfast.linear
    return _compiled if impl == "torch.compile" else F.linear


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_forward(benchmark, impl, case):
    run_linear_benchmark(benchmark, "linear", _fn(impl), impl, case, SHAPES, DTYPE, grad=False, reference=F.linear)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_forward_backward(benchmark, impl, case):
    run_linear_benchmark(benchmark, "linear", _fn(impl), impl, case, SHAPES, DTYPE, grad=True, reference=F.linear)
