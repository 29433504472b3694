"""compile_only: Triton kernels compiled for an NVIDIA GPU on a machine without one (the check behind
scripts/compile_triton.py, which compiles every vitfast kernel for sm_90 in CI).

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

import vitfast  # noqa: E402
from vitfast import backend  # noqa: E402
from vitfast.triton import common  # noqa: E402
from vitfast.triton.common import GPU, H100, compile_only  # noqa: E402

if torch.cuda.is_available():
    pytest.skip("compile-only mode stands CPU tensors in for a GPU's; this machine has one", allow_module_level=True)
compiling = pytest.mark.skipif(backend.triton_interpret(), reason="runs in the TRITON_INTERPRET=0 process")


@pytest.mark.skipif(not backend.triton_interpret(), reason="this is that process")
def test_in_a_compiling_process():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"], env=env,
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0 and "5 passed" in proc.stdout, proc.stdout + proc.stderr


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


def _launch(kernel, *tensors, **constexprs):
    kernel[(1,)](*tensors, **constexprs)


@compiling
def test_records_registers_and_shared_memory_of_a_compiled_kernel():
    a = torch.randn(64, 64, dtype=torch.float16)
    with compile_only(H100) as records:
        _launch(_matmul_kernel, a, a, torch.empty_like(a), BLOCK=64)
    (rec,) = records
    assert rec.kernel == "_matmul_kernel" and rec.config["BLOCK"] == 64 and not rec.error and not rec.problems
    assert rec.registers > 0 and rec.shared_bytes > 0


@compiling
def test_reports_shared_memory_the_gpu_does_not_have():
    a = torch.randn(64, 64, dtype=torch.float16)
    tiny = GPU("sm_90 with 1 KiB of shared memory", 90, 132, 1024)
    with compile_only(tiny) as records:
        _launch(_matmul_kernel, a, a, torch.empty_like(a), BLOCK=64)
    assert records[0].problems and "shared memory" in records[0].problems[0]


@compiling
def test_a_config_the_autotuner_skips_is_marked_as_such():
    a = torch.randn(64, 64, dtype=torch.float16)
    with compile_only(H100) as records:
        _launch(_matmul_kernel, a, a, torch.empty_like(a), BLOCK=16)
    limit = records[0].shared_bytes  # BLOCK=16 fits, BLOCK=64 does not
    tuned = triton.autotune([triton.Config({"BLOCK": b}) for b in (64, 16)], key=[])(_matmul_kernel)
    with compile_only(GPU("sm_90 with the shared memory of BLOCK=16", 90, 132, limit)) as records:
        _launch(tuned, a, a, torch.empty_like(a))
    big, small = records
    assert big.config["BLOCK"] == 64 and big.problems and big.autotuner_skips
    assert small.config["BLOCK"] == 16 and not small.problems and not small.autotuner_skips


@compiling
def test_records_a_compile_error_and_goes_on():
    x = torch.randn(32)
    with compile_only(H100) as records:
        _launch(_broken_kernel, x, BLOCK=32)
        _launch(_matmul_kernel, *[torch.randn(16, 16, dtype=torch.float16)] * 3, BLOCK=16)
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
