"""A patched model trains under torch.distributed: DDP, and FSDP2's `fully_shard` where this torch has it (patched
before sharding or after it); a patched MLP runs under tensor parallelism.

Two CPU processes on gloo each take half of a batch; their synchronised gradients must equal the gradients of
one process on the whole batch (the loss is a mean over samples, so the halves' average is the whole's).
The model is torch-only (nn.TransformerEncoderLayer's MultiheadAttention and LayerNorms, patched by
vitfast.patch_model) plus vitfast's own WindowAttention, so the test needs no optional library.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import vitfast

WORLD = 2
BATCH = 4

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    fully_shard = None


class TinyViT(nn.Module):
    """An encoder layer over tokens, then window attention over the same tokens as a 4 x 4 map."""

    def __init__(self):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(32, 2, dim_feedforward=48, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.window = vitfast.nn.WindowAttention(32, 2, window_size=2, shift_size=1)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):  # (B, 16, 32)
        x = self.block(x)
        x = x + self.window(x.view(-1, 4, 4, 32)).view(x.shape)
        return self.head(self.norm(x).mean(1))


COUNTS = {"attention": 1, "layer_norm": 3, "linear": 6}


def _model(patch: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = TinyViT()
    if patch:
        report = vitfast.patch_model(model)
        assert report.counts() == COUNTS, str(report)
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 16, 32, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _grads(model: nn.Module) -> dict:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
            g = g.full_tensor()
        out[name.replace("module.", "")] = g.detach().clone()
    return out


def _step(model: nn.Module, x, y) -> None:
    nn.functional.cross_entropy(model(x), y).backward()


def _tensor_parallel_error() -> float:
    """The largest difference between a patched MLP split by tensor parallelism (DTensor weights and inputs) and the
    whole one, with and without grad (vitfast.linear, which has no sharding rules, raised NotImplementedError on
    DTensors: the patched module runs its original there); and vitfast.linear called on DTensors at a size where
    its rule picks oneDNN (it raised there, and ran F.linear at smaller sizes)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(384, 1536), nn.ReLU(), nn.Linear(1536, 384))  # (oneDNN's size at 136 rows)
    x = torch.randn(8, 17, 384, generator=torch.Generator().manual_seed(2))
    want = mlp(x).detach()
    vitfast.patch_model(mlp)
    mesh = init_device_mesh("cpu", (WORLD,))
    parallelize_module(mlp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    w = torch.randn(1536, 384, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        error = (mlp(x) - want).abs().max().item()
        got = vitfast.linear(distribute_tensor(x, mesh, [Replicate()]), distribute_tensor(w, mesh, [Replicate()]))
        error = max(error, (got.full_tensor() - nn.functional.linear(x, w)).abs().max().item())
    return max(error, (mlp(x) - want).abs().max().item())


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        ddp = nn.parallel.DistributedDataParallel(_model())
        _step(ddp, x[shard], y[shard])
        results = {"ddp": _grads(ddp)}
        if fully_shard is not None:
            model = _model()
            fully_shard(model.block)
            fully_shard(model)
            _step(model, x[shard], y[shard])
            results["fsdp2"] = _grads(model)
            # patched after sharding: the modules fully_shard gave classes of their own (FSDPMultiheadAttention,
            # FSDPLayerNorm, FSDPLinear) were not recognised, silently
            model = _model(patch=False)
            for module in (model.block.self_attn, model.norm, model.head, model.block, model):
                fully_shard(module)
            results["counts after fully_shard"] = vitfast.patch_model(model).counts()
            _step(model, x[shard], y[shard])
            results["patched after fsdp2"] = _grads(model)
        results["tp"] = _tensor_parallel_error()
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "grads.pt"))
        # both ranks past their collectives before either tears its group down: in a loaded CI run one rank's
        # teardown while the other's gloo work was in flight aborted it ("terminate called without an active
        # exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_ddp_and_fsdp2_gradients_match_single_process(tmp_path):
    model = _model()
    _step(model, *_data())
    expected = _grads(model)

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "grads.pt")
    assert results.pop("tp") < 1e-5
    if fully_shard is not None:
        assert results.pop("counts after fully_shard") == COUNTS
    assert set(results) == ({"ddp", "fsdp2", "patched after fsdp2"} if fully_shard is not None else {"ddp"})
    for mode, grads in results.items():
        assert set(grads) == set(expected), mode
        for name, g in grads.items():
            torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{mode} {name}: {m}")
