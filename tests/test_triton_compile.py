"""compile_only: Triton kernels compiled for an NVIDIA GPU on a machine without one (the check behind
scripts/compile_triton.py, which compiles every vitfast kernel for sm_90 in CI): shared memory, register spills and
the autotuner's choice among configs, grids against CUDA's limits, launches that bypass `launch`, and, with launches
recorded instead of compiled, the fp32 precision rule and the bucketed autotuning keys of every op.

Compiling needs Triton's compiler, which TRITON_INTERPRET=1 (set by conftest for the rest of the suite on a CPU
machine) replaces at decoration time: under the interpreter, one test runs this module again in a process with
TRITON_INTERPRET=0.
"""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import vitfast  # noqa: E402
from vitfast import backend  # noqa: E402
from vitfast.triton import common  # noqa: E402
from vitfast.triton.common import GPU, H100, compile_only, launch  # noqa: E402

from _prefix_sum import prefix_sum_kernel  # noqa: E402

if torch.cuda.is_available():
    pytest.skip("compile-only mode stands CPU tensors in for a GPU's; this machine has one", allow_module_level=True)
compiling = pytest.mark.skipif(backend.triton_interpret(), reason="runs in the TRITON_INTERPRET=0 process")


@pytest.mark.skipif(not backend.triton_interpret(), reason="this is that process")
def test_in_a_compiling_process():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"], env=env,
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0 and "12 passed" in proc.stdout, proc.stdout + proc.stderr


def test_compile_only_refuses_the_interpreter():
    if not backend.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with compile_only(H100):
            pass


@triton.jit
def _matmul_kernel(A, B, C, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    a = tl.load(A + r[:, None] * BLOCK + r[None, :])
    b = tl.load(B + r[:, None] * BLOCK + r[None, :])
    tl.store(C + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))


@triton.jit
def _broken_kernel(X, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tl.store(X + r, tl.load(X + r) @ tl.load(X + r))  # a rank-1 dot: rejected by the compiler


@compiling
def test_records_registers_and_shared_memory_of_a_compiled_kernel():
    a = torch.randn(64, 64, dtype=torch.float16)
    with compile_only(H100) as records:
        launch(_matmul_kernel, (1,), a, a, torch.empty_like(a), BLOCK=64)
    (rec,) = records
    assert rec.kernel == "_matmul_kernel" and rec.config["BLOCK"] == 64 and not rec.error and not rec.problems
    assert rec.registers > 0 and rec.shared_bytes > 0


@compiling
def test_reports_shared_memory_the_gpu_does_not_have():
    a = torch.randn(64, 64, dtype=torch.float16)
    tiny = GPU("sm_90 with 1 KiB of shared memory", 90, 132, 1024)
    with compile_only(tiny) as records:
        launch(_matmul_kernel, (1,), a, a, torch.empty_like(a), BLOCK=64)
    assert records[0].problems and "shared memory" in records[0].problems[0]


@compiling
def test_a_config_the_autotuner_skips_is_marked_as_such():
    a = torch.randn(64, 64, dtype=torch.float16)
    with compile_only(H100) as records:
        launch(_matmul_kernel, (1,), a, a, torch.empty_like(a), BLOCK=16)
    limit = records[0].shared_bytes  # BLOCK=16 fits, BLOCK=64 does not
    tuned = triton.autotune([triton.Config({"BLOCK": b}) for b in (64, 16)], key=[])(_matmul_kernel)
    with compile_only(GPU("sm_90 with the shared memory of BLOCK=16", 90, 132, limit)) as records:
        launch(tuned, (1,), a, a, torch.empty_like(a))
    big, small = records
    assert big.config["BLOCK"] == 64 and big.problems and small.config["BLOCK"] == 16 and not small.problems
    assert [launch.autotuner_skips for launch in records.launches] == [True, False]


@compiling
def test_records_a_compile_error_and_goes_on():
    x = torch.randn(32)
    with compile_only(H100) as records:
        launch(_broken_kernel, (1,), x, BLOCK=32)
        launch(_matmul_kernel, (1,), *[torch.randn(16, 16, dtype=torch.float16)] * 3, BLOCK=16)
    assert [r.kernel for r in records] == ["_broken_kernel", "_matmul_kernel"]
    assert records[0].error and not records[1].error


@compiling
def test_vitfast_op_compiles_its_gpu_path_and_state_is_restored():
    x, w, b = torch.randn(8, 768), torch.randn(768), torch.randn(768)
    with compile_only(H100) as records, vitfast.use_backend("triton"):
        assert common.compiled(x) and common.num_sms(x) == H100.sms
        vitfast.layer_norm(x, (768,), w, b)
    assert [r.kernel for r in records] == ["_layer_norm_fwd_kernel"] and records[0].config["BLOCK_N"] == 1024
    assert not common.compiled(x) and not backend._triton_compile_only
    y = vitfast.layer_norm(x, (768,), w, b)  # runs again, on the CPU backends
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (768,), w, b))


@compiling
def test_a_grid_beyond_cuda_limits_is_flagged():
    a = torch.randn(16, 16, dtype=torch.float16)
    with compile_only(H100) as records:
        launch(_matmul_kernel, (1, 65535), a, a, torch.empty_like(a), BLOCK=16)
        launch(_matmul_kernel, (2, 65536), a, a, torch.empty_like(a), BLOCK=16)
        launch(_matmul_kernel, (2**31,), a, a, torch.empty_like(a), BLOCK=16)
    ok, y_over, x_over = records.launches
    assert ok.problems == []
    assert "dim 1 = 65536 > 65535" in y_over.problems[0] and "dim 0 = 2147483648" in x_over.problems[0]
    assert len(records) == 1  # one specialization, compiled once


@compiling
def test_a_launch_that_bypasses_launch_is_flagged():
    a = torch.randn(16, 16, dtype=torch.float16)
    with compile_only(H100) as records:
        _matmul_kernel[(1,)](a, a, torch.empty_like(a), BLOCK=16)
    assert "without vitfast.triton.common.launch" in records.launches[0].problems[0]


@compiling
def test_a_spilling_config_is_skipped_when_another_does_not_spill():
    x = torch.randn(4096)
    squeezed = triton.Config({"BLOCK": 1024}, num_warps=1, maxnreg=32)  # 1024 values on 32 threads in 32 registers
    roomy = triton.Config({"BLOCK": 128}, num_warps=1)
    with compile_only(H100) as records:
        launch(common.autotune([squeezed, roomy], key=[])(prefix_sum_kernel), (1,), x, torch.empty_like(x),
               x.numel())
        launch(common.autotune([squeezed], key=[])(prefix_sum_kernel), (1,), x, torch.empty_like(x), x.numel())
    spilling, fine = records
    assert spilling.spill_bytes > 0 and spilling.config["BLOCK"] == 1024 and fine.spill_bytes == 0
    assert [launch.autotuner_skips for launch in records.launches] == [True, False, False]


@compiling
def test_batch_times_heads_past_65535_stays_within_the_grid_limits():
    """Swin-B stage 4 (32 heads) from batch 2048, and attention over as many (batch, head) pairs: here with tiny
    windows and sequences, forward and backward."""
    qkv = torch.empty(64, 2, 2, 3, 1024, 16, dtype=torch.bfloat16, requires_grad=True)
    q = torch.empty(520, 128, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    with compile_only(H100) as records, vitfast.use_backend("triton"):
        vitfast.window_attention(qkv, torch.zeros(9, 1024), 2).sum().backward()
        vitfast.attention(q, q, q).sum().backward()
    assert {r.kernel for r in records} >= {"_window_attn_fwd_kernel", "_window_attn_bwd_kernel",
                                           "_attention_fwd_kernel", "_attention_bwd_dkdv_kernel"}
    assert not [launch.problems for launch in records.launches if launch.problems]


class _Recorder:
    """Under compile_only, takes the place of Triton's launch: records each launch's kernel, constexprs and
    autotuning key, compiles and runs nothing (outputs stay uninitialised)."""

    def __init__(self, monkeypatch):
        self.launches = []
        recorder = self

        def jit_run(fn, *args, grid, warmup, **kwargs):
            recorder.launches.append((fn.__name__, kwargs, None))

        def tuner_run(tuner, *args, grid, warmup, **kwargs):
            named = dict(zip(tuner.arg_names, args), **kwargs)
            recorder.launches.append((tuner.base_fn.__name__, kwargs, tuple(named[k] for k in tuner.keys)))

        monkeypatch.setattr(JITFunction, "run", jit_run)
        monkeypatch.setattr(Autotuner, "run", tuner_run)


def _every_op(dtype, N):
    """Forward and backward of every op with a tl.dot, tiny, with sequence / token counts set by N."""
    def leaf(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt, requires_grad=True)
    q = leaf(1, 2, N, 32)
    vitfast.attention(q, q, q).sum().backward()
    vitfast.window_attention(leaf(1, 7, 7, 3, 2, 32), leaf(169, 2, dt=torch.float32), 7).sum().backward()
    vitfast.patch_embed(leaf(1, 3, 4 * N, 16), leaf(8, 3, 4, 4), leaf(8), 4).sum().backward()
    vitfast.patch_merging(leaf(1, 2 * N, 4, 8), leaf(32), leaf(32), leaf(16, 32)).sum().backward()


_KERNELS_WITH_DOTS = {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_window_attn_fwd_kernel",
                      "_window_attn_stats_kernel", "_window_attn_bwd_kernel", "_patch_embed_fwd_kernel",
                      "_patch_embed_bwd_dx_kernel", "_patch_embed_bwd_dw_kernel", "_patch_merging_fwd_kernel",
                      "_patch_merging_bwd_dr_kernel", "_patch_merging_bwd_dln_kernel"}


@compiling
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_every_op_follows_the_fp32_precision_rule(monkeypatch, allow_tf32):
    """fp32 products in TF32 exactly when torch.backends.cuda.matmul.allow_tf32 is set, in every kernel with a
    tl.dot; fp16/bf16 products (exact into fp32 either way) always as "ieee"."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    for dtype, expected in ((torch.float32, "tf32" if allow_tf32 else "ieee"), (torch.bfloat16, "ieee")):
        with compile_only(H100), vitfast.use_backend("triton"), monkeypatch.context() as m:
            recorder = _Recorder(m)
            _every_op(dtype, 16)
        seen = {(name, v) for name, kwargs, _ in recorder.launches for v in kwargs.values()
                if isinstance(v, str) and v in ("ieee", "tf32")}
        assert {name for name, _ in seen} == _KERNELS_WITH_DOTS and {v for _, v in seen} == {expected}, seen


@compiling
def test_autotuning_keys_bucket_the_sizes(monkeypatch):
    """A new sequence length or token count in the same power-of-two bucket reuses the tuned choice: the autotuner's
    key is the same; the next bucket gets its own."""
    keys = {}
    for N in (20, 30, 40):
        with compile_only(H100), vitfast.use_backend("triton"), monkeypatch.context() as m:
            recorder = _Recorder(m)
            _every_op(torch.bfloat16, N)
        keys[N] = {(name, key) for name, _, key in recorder.launches if key is not None}
    tuned = {name for name, _ in keys[20]}
    assert tuned == {"_attention_fwd_kernel", "_patch_embed_fwd_kernel", "_patch_embed_bwd_dx_kernel",
                     "_patch_embed_bwd_dw_kernel", "_patch_merging_fwd_kernel", "_patch_merging_bwd_dr_kernel"}
    assert keys[20] == keys[30] and keys[30] != keys[40]
