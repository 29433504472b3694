"""The launch path of the Triton kernels (vitfast.triton.common) and the GPU-only hazards around it: the device
guard, CUDA's grid limits, dropout under CUDA graph capture, the fp32 precision rule and the autotuner's pruning of
spilling configs.

The logic of each is tested here on any machine; what only a GPU can show (a second device, a captured graph, TF32
rounding, the driver's spill counts) is in the tests marked `gpu`, skipped without CUDA.
"""
import contextlib

import pytest
import torch

import vitfast
from vitfast.ops.attention import attention_ref, check_dropout_capture
from vitfast.triton import common

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _FakeKernel:
    """Stands in for a Triton kernel: records the grid and the CUDA device active when it is launched."""

    def __init__(self, active):
        self.fn = _FakeKernel  # launch names a kernel by its function's __name__
        self.active, self.launches = active, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, self.active[-1] if self.active else None))


def _device_recorder(monkeypatch):
    """Replaces torch.cuda.device by a context manager that records which device index is active."""
    active = []

    @contextlib.contextmanager
    def device(d):
        active.append(torch.device(d).index)
        yield
        active.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    return active


def test_launch_runs_under_a_guard_for_the_device_of_its_tensors(monkeypatch):
    from torch._subclasses import fake_tensor

    active = _device_recorder(monkeypatch)
    # FakeTensorMode allocates on the real device where CUDA is present ("invalid device ordinal" on one GPU)
    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda device: None)
    with fake_tensor.FakeTensorMode():
        x = torch.empty(4, device="cuda:1")  # a tensor on a second GPU, without needing one
    kernel = _FakeKernel(active)
    common.launch(kernel, (2,), x, 4, BLOCK=4)
    common.launch(kernel, (2,), torch.empty(4), 4, BLOCK=4)  # CPU tensors (interpreter): no guard
    assert kernel.launches == [((2,), 1), ((2,), None)]


def test_launch_refuses_a_grid_beyond_cuda_limits():
    kernel = _FakeKernel([])
    x = torch.empty(3, 5)
    with pytest.raises(ValueError, match=r"_FakeKernel cannot launch for inputs \[\(3, 5\) torch.float32\]: grid "
                                         r"\(1, 65536\) beyond CUDA's limits \(dim 1 = 65536 > 65535\)"):
        common.launch(kernel, (1, 65536), x)
    common.launch(kernel, lambda meta: (meta["BLOCK"],), x, BLOCK=2**31 - 1)  # a grid function, at the limit
    grid, _ = kernel.launches[0]
    assert grid({"BLOCK": 7}) == (7,)
    with pytest.raises(ValueError, match=r"dim 0 = 2147483648 > 2147483647"):
        grid({"BLOCK": 2**31})


def test_grid_problem_names_each_dimension_over_the_limit():
    assert common.grid_problem((2**31 - 1, 65535, 65535)) is None
    assert common.grid_problem((2**31, 1, 65536)) == ("grid (2147483648, 1, 65536) beyond CUDA's limits "
                                                      "(dim 0 = 2147483648 > 2147483647, dim 2 = 65536 > 65535)")
    assert "1 to 3 dimensions" in common.grid_problem((1, 1, 1, 1))


def test_int32_head_offsets_copies_only_a_head_dim_whose_offsets_pass_2_pow_31():
    """The attention kernels' head-dim offsets are int32: a view whose head dim is outermost in a huge tensor (so
    (D - 1) * stride(-1) passes 2**31) is copied to unit stride, every other layout is read in place (meta
    tensors: no memory behind the strides)."""
    wide = torch.empty_strided((1, 2, 3, 64), (3, 3, 1, 2**26), device="meta")  # 63 * 2**26 > 2**31
    edge = torch.empty_strided((1, 2, 3, 65), (3, 3, 1, 2**25), device="meta")  # 64 * 2**25 = 2**31
    fits = torch.empty_strided((1, 2, 3, 64), (3, 3, 1, 2**25), device="meta")  # 63 * 2**25 < 2**31
    got = common.int32_head_offsets(wide, edge, fits)
    assert got[0].stride(-1) == 1 and got[1].stride(-1) == 1
    assert got[2] is fits


def test_usable_configs_never_leave_a_spilling_config_beside_one_that_does_not_spill():
    configs = ["a", "b", "c", "d"]
    assert common.usable_configs(configs, [12, 0, None, 0]) == ["b", "d"]  # spill-free ones only
    assert common.usable_configs(configs, [12, None, 40, None]) == ["a", "c"]  # all spill: those that load
    assert common.usable_configs(configs, [None] * 4) == configs  # none loads: Triton's own error follows


def test_prune_hook_compiles_every_config_with_the_launch_arguments():
    """As Triton's autotuner calls its early_config_prune hook (positional arguments by name; keyword arguments with
    the launch's grid and warmup flag); the driver's spill counts and OutOfResources are faked."""
    import triton
    from triton.runtime.errors import OutOfResources

    class Binary:
        def __init__(self, block):
            self.block, self.n_spills = block, {128: 0, 1024: 8}.get(block)

        def _init_handles(self):
            if self.n_spills is None:
                raise OutOfResources(300000, 232448, "shared memory")

    compiled = []

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            compiled.append((args, kwargs))
            return Binary(kwargs["BLOCK"])

    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (1024, 128, 4096)]
    x = torch.empty(8)
    kept = common._prune_configs(Kernel(), configs, {"X": x, "N": 8}, grid=lambda meta: (1,), warmup=False,
                                 FLAG=True)
    assert kept == [configs[1]]
    assert [args for args, _ in compiled] == [(x, 8)] * 3
    assert [(kw["BLOCK"], kw["FLAG"], kw["num_warps"]) for _, kw in compiled] == [(1024, True, 4), (128, True, 4),
                                                                                  (4096, True, 4)]


def test_tune_bucket_is_the_next_power_of_two():
    assert [common.tune_bucket(n) for n in (0, 1, 49, 64, 65, 197, 850)] == [1, 1, 64, 64, 128, 256, 1024]


def test_dropout_under_cuda_graph_capture_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"vitfast.attention: dropout \(p=0.1\) inside CUDA graph capture"):
        check_dropout_capture("attention", 0.1, torch.device("cuda", 0))
    check_dropout_capture("attention", 0.0, torch.device("cuda", 0))  # no dropout: nothing drawn on the host
    check_dropout_capture("attention", 0.1, torch.device("cpu"))  # no graph capture on the CPU


def test_fp32_dot_precision_follows_torch_allow_tf32(monkeypatch):
    x32, x16 = torch.empty(1), torch.empty(1, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert (common.dot_precision(x32), common.dot_precision(x16)) == ("ieee", "ieee")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert (common.dot_precision(x32), common.dot_precision(x16)) == ("tf32", "ieee")


# ------------------------------------------------------------------------------------------------ on a GPU

@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x, w, b = torch.randn(197, 768, device=dev), torch.randn(768, device=dev), torch.randn(768, device=dev)
    torch.testing.assert_close(vitfast.layer_norm(x, 768, w, b), torch.nn.functional.layer_norm(x, (768,), w, b))
    q, k, v = (torch.randn(2, 3, 197, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(vitfast.attention(q, k, v), attention_ref(q, k, v), atol=2e-2, rtol=2e-2)


def _capture(fn):
    graph = torch.cuda.CUDAGraph()
    fn()  # compile and autotune outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@gpu
def test_cuda_graph_replays_attention_and_refuses_dropout():
    q, k, v = (torch.randn(2, 3, 197, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    graph, out = _capture(lambda: vitfast.attention(q, k, v))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(out, vitfast.attention(q, k, v))
    with pytest.raises(RuntimeError, match="inside CUDA graph capture"):
        _capture(lambda: vitfast.attention(q, k, v, dropout_p=0.1))
    qkv = torch.randn(2, 14, 14, 3, 2, 32, device="cuda", dtype=torch.bfloat16)
    table = torch.randn(169, 2, device="cuda")
    with pytest.raises(RuntimeError, match="inside CUDA graph capture"):
        _capture(lambda: vitfast.window_attention(qkv, table, 7, 3, attention_dropout=0.1))


@gpu
@pytest.mark.parametrize("op", ["attention", "patch_embed", "patch_merging", "window_attention"])
def test_fp32_products_are_ieee_unless_tf32_is_allowed(monkeypatch, op):
    """fp32 error against float64: IEEE products (the default) are ~1e-6 relative; TF32 products (10-bit
    mantissas) ~1e-3, and only when torch.backends.cuda.matmul.allow_tf32 allows them."""
    torch.manual_seed(0)
    if op == "attention":
        args = [torch.randn(2, 2, 256, 64, device="cuda") for _ in range(3)]
        fn = vitfast.attention
    elif op == "patch_embed":
        args = [torch.randn(2, 3, 64, 64, device="cuda"), torch.randn(64, 3, 16, 16, device="cuda"), None, 16]
        fn = vitfast.patch_embed
    elif op == "patch_merging":
        args = [torch.randn(2, 16, 16, 64, device="cuda"), None, None, torch.randn(128, 256, device="cuda")]
        fn = vitfast.patch_merging
    else:
        args = [torch.randn(2, 14, 14, 3, 2, 32, device="cuda"), torch.randn(169, 2, device="cuda"), 7, 3]
        fn = vitfast.window_attention
    with vitfast.use_backend("torch"):
        ref = fn(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    errors = {}
    for allow in (False, True):
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow)
        with vitfast.use_backend("triton"):
            out = fn(*args)
        errors[allow] = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert errors[False] < 2e-5 and errors[True] > 4 * errors[False], errors


@gpu
def test_autotuner_prunes_a_spilling_config_on_the_gpu():
    import triton
    from _prefix_sum import prefix_sum_kernel

    x = torch.randn(4096, device="cuda")
    squeezed = triton.Config({"BLOCK": 1024}, num_warps=1, maxnreg=32)  # spills (sm_90, compile_only)
    roomy = triton.Config({"BLOCK": 128}, num_warps=1)
    y = torch.empty_like(x)
    kept = common._prune_configs(prefix_sum_kernel, [squeezed, roomy], {"X": x, "Y": y, "N": x.numel()})
    assert kept == [roomy]
    tuned = common.autotune([squeezed, roomy], key=[])(prefix_sum_kernel)
    common.launch(tuned, (1,), x, y, x.numel())
    torch.testing.assert_close(y, x.cumsum(0), atol=1e-4, rtol=1e-4)
    assert tuned.best_config is roomy


def test_autotuned_launches_from_two_threads_run_one_at_a_time():
    """nn.DataParallel runs each GPU's replica in its own thread. Triton's Autotuner keeps a call's arguments on the
    shared object and clears them on exit (triton-lang/triton#11494): two first calls at once failed with
    "'NoneType' object is not a mapping". Here the benchmark is a sleep (on a GPU it syncs and drops the GIL) and
    the kernel's launch a no-op; the rest is Triton's Autotuner under vitfast's launch."""
    import threading
    import time

    import triton
    import triton.language as tl

    @triton.jit
    def kernel(X, n, n_bucket, BLOCK: tl.constexpr):
        pass

    tuned = triton.autotune([triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})], key=["n_bucket"])(kernel)
    tuned._do_bench = lambda fn, quantiles=None: (time.sleep(0.05), [1.0, 1.0, 1.0])[1]
    tuned.__dict__.pop("do_bench", None)
    tuned.fn.run = lambda *args, **kwargs: None
    errors = []

    def replica():
        try:
            common.launch(tuned, (1,), torch.zeros(4), 4, 4)
        except Exception as e:  # noqa: BLE001 (any failure of a replica is the bug)
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_autotuned_kernels_key_on_the_fp32_precision():
    """patch_embed's and patch_merging's autotuners left PRECISION out of their keys: a config tuned under TF32 was
    reused for IEEE fp32. `autotune` refuses such a key."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(X, n_bucket, PRECISION: tl.constexpr, BLOCK: tl.constexpr):
        pass

    configs = [triton.Config({"BLOCK": 16})]
    with pytest.raises(ValueError, match="must key on PRECISION"):
        common.autotune(configs, ["n_bucket"])(kernel)
    assert common.autotune(configs, ["n_bucket", "PRECISION"])(kernel).keys == ["n_bucket", "PRECISION"]
