"""Whether a module patched by `vitfast.patch_model` runs vitfast's op or its original (ATen) code, per device type.

The one rule the guard of every patched method asks (`runs_original(kind, x)`, x: the call's first tensor, positional
or keyword), and with it the choices made inside a call (the MLP's output-size rule, SAM's attention without rel-pos
tables, transformers' attention interface, which is no patched method): a patched module
keeps vitfast's op where it measured faster than the code it replaces, and runs its own original forward where it
measured slower, so a patched model runs no op slower than the original's (its modules' Python dispatch aside: about
1% of a DeiT-S forward at batch 1, README). `use_backend(...)` or VITFAST_BACKEND, forcing a vitfast backend, always
runs vitfast's op. Tensors on other devices (meta) run vitfast's op.

CUDA (the GPU table, `CHOICE["cuda"]`): from the first GPU run, bench/results/h200-2026-11-30 (`bash
bench/gpu_run.sh`: NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, bf16, pytest-benchmark medians, one shape class
per kind; vitfast time / ATen time, > 1: vitfast faster):

| kind             | forward                                        | forward + backward                     | choice  |
|------------------|------------------------------------------------|----------------------------------------|---------|
| layer_norm       | triton 0.56x, CUDA kernel 1.03x of F.layer_norm | triton 0.21x, CUDA 0.51x              | ATen    |
| attention        | 0.28x cuDNN SDPA (ViT-B/16), 0.52x (DETR encoder, key padding) | 0.29x, 0.37x            | ATen    |
| patch_embed      | 5.19x conv2d + flatten (ViT-B/16 B=256)        | 1.83x                                  | vitfast |
| window_attention | 2.99x the fastest SDPA over the partitioned windows (Swin-T stage 1) | 1.08x            | vitfast |
| rel_pos_attention| 3.36x cuDNN SDPA with the dense decomposed bias (SAM-B global) | 3.20x                   | vitfast |
| linear_gelu      | 0.33x torch._addmm_activation, 0.55x F.linear + F.gelu (Swin-T fc1) | 0.52x             | ATen    |
| linear           | not measured: vitfast.linear is F.linear (cuBLAS) on CUDA tensors | -                   | ATen    |

The ATen code a patched attention module falls back to is its own: SDPA in timm (fused_attn, the default),
torchvision's MultiheadAttention, open_clip and transformers' SDPA path; a timm model built with fused_attn=False
runs its eager attention, which vitfast's measured 3.3x faster (forward) but which the user chose. Not yet measured on
a GPU: float16 and float32, other shape classes, whole models.

CPU (`CHOICE["cpu"]`):
The table below comes from `python bench/cpu_choice.py --threads 2 --reps 9` (ATen / vitfast time, > 1: vitfast
faster; medians of 9 interleaved calls in one process), on a 2-core AMD EPYC VM (AVX2), torch 2.13.0+cpu, fp32,
2026-11-30, on a quiet machine (an earlier 1-thread run under load gave the same sides). Shapes are those of
ViT-B/16, DeiT-S/16, CLIP ViT-B/32 and Swin-T at batch 1 and 8 (rows 49 .. 25088, hidden 96 .. 768):

| kind             | inference (no grad)                        | training (forward + backward)          | choice         |
|------------------|--------------------------------------------|----------------------------------------|----------------|
| layer_norm       | 0.29 .. 0.84 (with residual: 0.34 .. 0.93) | 0.37 .. 0.88 (residual: 0.42 .. 0.64)  | ATen           |
| attention        | 0.62 .. 0.89                               | 0.59 .. 0.93                           | ATen           |
| patch_embed      | ViT 0.98 .. 1.06, Swin with norm 0.74 .. 0.80 | 1.23 .. 1.97 (image with grad)      | ATen / vitfast |
| window_attention | 1.07 .. 1.68                               | 1.00 .. 1.78                           | vitfast        |
| rel_pos_attention| 1.86 .. 2.06                               | 2.20 .. 2.44                           | vitfast        |
| linear_gelu      | >= 32 MiB out 1.45, oneDNN 1.00 .. 1.08, else 0.93 .. 1.09 | 0.78 .. 1.01           | see below      |
| linear           | see below                                  | see below                              | vitfast        |

rel_pos_attention (SAM/ViTDet image encoders) is against SDPA with the dense decomposed bias that transformers' and
timm's SAM attention pass (SAM-B global layer B=1 and windowed layer 25 windows, 12 heads, D=64; same command with
`-k rel_pos`, 2 threads, same VM, 2026-11-30; the README's table).

patch_embed with grad (2026-12-02, the AVX-512 machine below, same command with `-k patch_embed --reps 21`:
bench/results/cpu-avx512-2026-12-02/cpu_choice_patch_embed.md): the training rows above had the image require grad,
so ATen's convolution backward formed the image's gradient too. A model's image does not, and then ATen's backward,
which forms only the weights' gradients, is the faster: 0.77 .. 0.87 (Swin-T with norm at batch 8: 1.04) at ViT-B/16,
DeiT-S and Swin-T shapes at batch 1, 2 and 8, against 1.17 .. 2.25 with the image's gradient. So with grad the
patched patch embedding runs vitfast's op only where its image requires grad (`CPU_WITH_INPUT_GRAD_ONLY`). An image
that requires grad into frozen weights (saliency maps, adversarial attacks), where both sides form the image's
gradient alone: 1.20 .. 2.78 at the same shapes (2026-12-03, same machine, `-k frozen --reps 9`:
bench/results/cpu-avx512-2026-12-03/cpu_choice_patch_embed_frozen.md).

linear_gelu (an MLP's fc1 + GELU; 2026-11-30, same command, 15 reps, fc1 of the models above) wins clearly in one
place: inference where the (M, N) output is at least 32 MiB (Swin-T's first stage at batch 8, 25088 x 384 fp32:
1.45). That is glibc's largest mmap threshold: each fresh tensor of that size is mapped and page-faulted anew, and
the fused op, which writes GELU over the GEMM's own output, allocates one such tensor where F.linear + F.gelu
allocate two. Below it the op is level (0.93 .. 1.09 per op; whole models with and without it, 15-25 alternating
rounds: torchvision Swin-T B=1 1.007, DeiT-S B=8 1.009, ViT-B/16 B=1 0.954), so those calls keep ATen. Whole Swin-T
models at B=8 with the rule against without the op (9-11 paired rounds): torchvision 1.013 and 1.052 in two runs,
timm 1.116, transformers 1.030. With grad it keeps ATen (it must keep h = x W^T + b anyway: 0.78 .. 1.01).
Since 2026-12-01 (AVX-512 machine below) linear_gelu has an onednn backend (GELU in oneDNN's inner-product epilogue)
that it takes for float32 where vitfast.linear's rule says oneDNN pays; against what a patched MLP runs otherwise
(vitfast.linear, then F.gelu) it measured 1.00 .. 1.08 without grad at those shapes (ViT-B/16, DeiT-S, CLIP B/32,
Swin-T stages 3-4) and 1.38 at Swin-T's first stage at batch 8 (the cpp kernel, 32 MiB), while the rows it leaves to
the cpp kernel below 32 MiB measured 0.91 .. 0.93. So a patched MLP without grad on CPU calls linear_gelu where the
output reaches 32 MiB or where the onednn backend takes the call (integrations/patch.py's mlp_fc1); with grad 0.75
.. 0.96: ATen (bench/results/cpu-avx512-2026-12-01/cpu_choice_linear.md). Since vitfast.linear's rule dropped its K,
N >= 384 condition without grad on AVX-512 (below), oneDNN takes every fc1 of these models without grad there: the
same command (cpu_choice_linear_min_dim_1.md there) gave 1.01 .. 1.08 for ViT-B/16, DeiT-S, CLIP and Swin-T stages
3-4, 1.05 and 1.04 for Swin-T stages 1 and 2 at batch 1, 1.51 for stage 1 at batch 8.

linear (every nn.Linear; 2026-12-01, same command with `-k linear`, on the AVX-512 machine below, Parameter weights,
not prepacked): vitfast.linear runs oneDNN's inner product where its own rule (ops/linear.py, `onednn_pays`: M K N
at least 2**25; with grad K and N at least 768, below AVX-512 384 without grad) says it pays and calls F.linear
itself elsewhere, so the module-level choice is vitfast in both modes. Against F.linear (MKL), without grad / with
grad: ViT-B/16 qkv, proj, fc2 at batch 1 1.25, 1.13, 1.23 / 1.16, 1.08, 1.17; at batch 8 (qkv, fc2) 1.04, 1.05 /
1.05, 1.03; CLIP B/32 fc2 at batch 8 1.12 / 1.11; DeiT-S at batch 8 1.00, 1.03 / 1.00, 1.00 (F.linear with grad);
Swin-T stages 3-4 1.07, 1.13 / 1.00, 1.13; the rows below the rule (F.linear through vitfast.linear) 0.96 .. 0.99,
its dispatch. Below the rule oneDNN itself measured 0.78 .. 0.95 (ops/linear.py). The rule then asked K, N >= 384
without grad too; with products of any K and N on oneDNN whole Swin-T models ran 1.00 .. 1.07x faster on AVX-512
(0.94 .. 1.07x with the libraries held to AVX2, where the rule keeps K, N >= 384; ops/linear.py) and the same
command (cpu_choice_linear_min_dim_1.md) gave Swin-T stage 1 fc2 (K 384, N 96) at batch 8 1.23 and stage 1 qkv (K
96) 0.82 at batch 1 and 0.90 at batch 8, where another run of those two products on oneDNN itself, 21 interleaved
rounds, gave 1.01 and 1.10 (this machine's spread at that size); the other rows as before.

MLP rows (inference; the whole MLP, fc1 + GELU + fc2, of a patched module): without grad on CPU a patched MLP runs
in chunks of rows (integrations/patch.py's mlp_rows) where its hidden activation (M, hidden) reaches
MLP_ROWS_MIN_HIDDEN_BYTES and all its parameters fit in one chunk's hidden activation (MLP_ROWS_CHUNK_BYTES): the
chunk's hidden stays in cache and below glibc's mmap threshold instead of being mapped, written, read back and
unmapped. Each chunk takes the rules above. Measured (`python bench/cpu_choice.py --reps 15 -k "mlp rows"`, float32,
2 threads, the AVX-512 machine below, 2026-12-01: bench/results/cpu-avx512-2026-12-01/cpu_choice_mlp_rows.md; the
MLP in one call / in chunks, > 1: chunks faster), hidden of 32 MiB or more: Swin-T stage 1 at batch 8 (25088 x 96 ->
384 -> 96) 1.28, at batch 16 1.32; stage 2 at batch 16 (12544 x 192 -> 768) 1.23; stage 3 at batch 32 (6272 x 384
-> 1536, parameters 4.5 MiB) 1.09; but ViT-B/16 at batch 16 (3152 x 768 -> 3072, parameters 18 MiB, re-read by
every chunk) 0.97; below 32 MiB chunks lose (stage 1 at batch 2 and 4, 9 and 18 MiB: 0.90, 0.91; stage 2 at batch
8: 0.92). An earlier run, before the linear rule's change above (bench/results/cpu-avx512-2026-12-01/README.md),
gave the same sides but two: stage 1 at batch 8 level (1.01) and stage 2 at batch 8 (18 MiB, not chunked) 1.11.
With grad autograd keeps every chunk's hidden anyway: one call.

The same command on an AVX-512 machine (Zen 4, 2026-12-01: bench/results/cpu-avx512-2026-12-01/cpu_choice.md) puts
every kind and mode on the same side as this table.

Every shape class measured falls on the same side for a given kind and mode (patch embedding without grad is
level at ViT shapes and slower at Swin's, so ATen), but for linear_gelu's output size and both linear kinds'
product size, so the rule is per (kind, mode), with `CPU_MIN_OUTPUT_BYTES` for linear_gelu and the ops' own
`onednn_pays` for the oneDNN choices (a backend choice inside the ops, made for every caller); a new shape class that
measures differently gets its row here (or in that rule), nowhere else.
"""
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from vitfast import backend as _backend

ATEN, VITFAST = "aten", "vitfast"

# device type -> kind -> (choice without grad, choice with grad); see the module docstring for the measurements.
CHOICE = {
    "cpu": {
        "layer_norm": (ATEN, ATEN),
        "attention": (ATEN, ATEN),
        "patch_embed": (ATEN, VITFAST),
        "window_attention": (VITFAST, VITFAST),
        "rel_pos_attention": (VITFAST, VITFAST),
        "linear_gelu": (VITFAST, ATEN),
        "linear": (VITFAST, VITFAST),
    },
    "cuda": {
        "layer_norm": (ATEN, ATEN),
        "attention": (ATEN, ATEN),
        "patch_embed": (VITFAST, VITFAST),
        "window_attention": (VITFAST, VITFAST),
        "rel_pos_attention": (VITFAST, VITFAST),
        "linear_gelu": (ATEN, ATEN),
        "linear": (ATEN, ATEN),
    },
}
# kind -> the smallest output (bytes) for which the CPU table's vitfast choice holds; smaller outputs run ATen.
CPU_MIN_OUTPUT_BYTES = {"linear_gelu": 2**25}
# kinds whose CPU choice with grad holds only where the input requires grad (patch_embed: a model's image does not,
# and then only the weights' gradients are formed, which ATen's convolution backward forms faster); others run ATen.
CPU_WITH_INPUT_GRAD_ONLY = {"patch_embed"}
_CPU, _CUDA = CHOICE["cpu"], CHOICE["cuda"]
# patched MLPs without grad on CPU: chunks of rows where the hidden activation is at least MLP_ROWS_MIN_HIDDEN_BYTES
# and the MLP's parameters at most MLP_ROWS_CHUNK_BYTES, each chunk's hidden activation MLP_ROWS_CHUNK_BYTES
MLP_ROWS_MIN_HIDDEN_BYTES = 2**25
MLP_ROWS_CHUNK_BYTES = 2**23


_TRACE_WITH_GRAD = (
    "vitfast: torch.jit.trace of a patched model with grad enabled on CPU: some patched modules choose other code "
    "without grad, so trace's check, which re-traces without grad, may fail with 'Graphs differed across "
    "invocations'; if it does, trace under torch.no_grad() (what an inference trace runs) or pass check_trace=False")


def runs_original(kind: str, x: Tensor, out_bytes: Optional[int] = None) -> bool:
    """Whether a module patched for `kind` should run its original forward for input `x`.

    Args:
        kind: one of the tables' keys (vitfast.integrations.patch.KINDS).
        x: the module's input tensor: its device is read, with torch.is_grad_enabled() for the mode, and for the
            kinds in CPU_WITH_INPUT_GRAD_ONLY whether it requires grad.
        out_bytes: the size of the op's output in bytes, for the kinds in CPU_MIN_OUTPUT_BYTES; None (the size not
            known yet: the guard of a patched method asks before the adapter runs) leaves that rule out.

    Returns:
        True on CPU and CUDA tensors where the device's table says ATen for the current mode (on CPU, or the output
        is below the kind's CPU_MIN_OUTPUT_BYTES, or x does not require grad for a kind in CPU_WITH_INPUT_GRAD_ONLY)
        and no vitfast backend is forced. Under torch.jit.trace with grad
        enabled on CPU it warns that trace's check may fail (the choices differ by grad mode).
    """
    if x.is_cpu:
        if torch.jit.is_tracing() and torch.is_grad_enabled():
            warnings.warn(_TRACE_WITH_GRAD, stacklevel=2)
        grad = torch.is_grad_enabled()
        if _CPU[kind][grad] == VITFAST and (out_bytes is None or out_bytes >= CPU_MIN_OUTPUT_BYTES.get(kind, 0)) and (
                not grad or x.requires_grad or kind not in CPU_WITH_INPUT_GRAD_ONLY):
            return False
    elif not x.is_cuda or _CUDA[kind][torch.is_grad_enabled()] == VITFAST:
        return False
    return _backend.forced_backend() is None  # (the environment read last: it is the slowest check)


def mlp_chunk_rows(x: Tensor, mlp: nn.Module, hidden: int) -> Optional[int]:
    """The rows per chunk in which a patched MLP without grad runs on CPU (module docstring, "MLP rows"), or None
    (in one call).

    Args:
        x: the MLP's input (*, C); float32 CPU tensors only (other dtypes and devices were not measured: None).
        mlp: the MLP module; all its parameters count (every chunk reads them).
        hidden: its hidden features (fc1's out_features).
    """
    if not x.is_cpu or x.dtype != torch.float32 or x.dim() == 0 or hidden < 1:
        return None
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    rows = MLP_ROWS_CHUNK_BYTES // (hidden * 4)
    if M * hidden * 4 < MLP_ROWS_MIN_HIDDEN_BYTES or rows < 1 or (
            sum(p.numel() * p.element_size() for p in mlp.parameters()) > MLP_ROWS_CHUNK_BYTES):
        return None
    return rows


# kind -> what the report adds beyond the tables
_NOTES = {"linear": " (on CPU oneDNN for large float32 products, F.linear for the others: vitfast.linear's rule)",
          "rel_pos_attention": ("; with attention dropout while training on CPU, vitfast's torch backend, which forms "
                                "the dense bias as the original does (the C++ kernel has no dropout); without rel-pos "
                                "tables, plain attention by the attention row")}


def _side(choice: str) -> str:
    return "original ATen code" if choice == ATEN else "vitfast"


def _mode_text(inference: str, training: str) -> str:
    if inference == training:
        return "original ATen code (faster there)" if inference == ATEN else "vitfast"
    return f"{_side(inference)} without grad, {_side(training)} with grad (the faster of the two)"


def describe(kind: str) -> str:
    """What `kind` runs on CPU and CUDA tensors, for patch_model's report, e.g. "on CPU and CUDA: original ATen code
    (faster there)"."""
    cpu, cuda = _mode_text(*_CPU[kind]), _mode_text(*_CUDA[kind])
    if kind in CPU_MIN_OUTPUT_BYTES:
        cpu = (f"vitfast without grad for outputs of {CPU_MIN_OUTPUT_BYTES[kind] >> 20} MiB or more or where its "
               f"oneDNN backend takes the call, else the original ATen code (the faster of the two)")
    if kind in CPU_WITH_INPUT_GRAD_ONLY:
        cpu = "vitfast with grad where the input (the image) requires grad, else the original ATen code (faster there)"
    text = f"on CPU and CUDA: {cpu}" if cpu == cuda else f"on CPU: {cpu}; on CUDA: {cuda}"
    return text + _NOTES.get(kind, "")
