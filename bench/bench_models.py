"""Reference models: images/s for inference and for training steps, vitfast vs sdpa vs eager backends and
torch.compile of the sdpa model, at ViT-B/16, DeiT-S and Swin-T (bf16 autocast on a GPU; tiny configs on a
CPU so that CI runs the suite). Peak memory comes from run_benchmark on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from vitfast.models import SwinTransformer, VisionTransformer
from vitfast.models.common import set_backend

from conftest import DEVICE, ON_GPU, run_benchmark

if ON_GPU:
    MODELS = {  # name: (builder, batch, image size)
        "vit_b16": (lambda: VisionTransformer.from_size("base", 16), 128, 224),
        "deit_s16": (lambda: VisionTransformer.from_size("small", 16, distilled=True), 128, 224),
        "swin_t": (lambda: SwinTransformer.from_size("tiny"), 64, 224),
    }
else:
    MODELS = {
        "vit_tiny": (lambda: VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2), 2, 64),
        "swin_tiny": (lambda: SwinTransformer(embed_dim=32, depths=(2, 2), num_heads=(2, 4)), 1, 56),
    }
IMPLS = ["vitfast", "sdpa", "eager", "sdpa+compile"]


def _model(name: str, impl: str):
    build, batch, size = MODELS[name]
    torch.manual_seed(0)
    model = set_backend(build(), impl.split("+")[0]).to(DEVICE)
    return (torch.compile(model) if impl.endswith("compile") else model), batch, size


def _autocast():
    return torch.autocast("cuda", torch.bfloat16) if ON_GPU else torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(MODELS))
def test_inference(benchmark, name, impl):
    if impl.endswith("compile") and not ON_GPU:
        pytest.skip("torch.compile of a whole model takes minutes on a 2-core CPU")
    model, batch, size = _model(name, impl)
    model.eval()

    def run(images):
        with torch.no_grad(), _autocast():
            return model(images)

    benchmark.group = f"{name} inference B={batch}"
    run_benchmark(benchmark, run, lambda: (torch.randn(batch, 3, size, size, device=DEVICE),), impl=impl)
    benchmark.extra_info["images/s"] = batch / benchmark.stats.stats.mean


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(MODELS))
def test_training_step(benchmark, name, impl):
    if impl.endswith("compile") and not ON_GPU:
        pytest.skip("torch.compile of a whole model takes minutes on a 2-core CPU")
    model, batch, size = _model(name, impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(images, labels):
        with _autocast():
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    benchmark.group = f"{name} training step B={batch}"
    run_benchmark(benchmark, step, lambda: (torch.randn(batch, 3, size, size, device=DEVICE),
                                            torch.randint(0, 1000, (batch,), device=DEVICE)), impl=impl)
    benchmark.extra_info["images/s"] = batch / benchmark.stats.stats.mean
