"""Reference models: images/s for inference and for training steps, vitfast vs sdpa vs eager backends and
torch.compile of the sdpa model, at ViT-B/16, DeiT-S, Swin-T, DETR (padded 800x1216 batches) and CLIP
ViT-B/16 (bf16 autocast on a GPU; tiny configs on a CPU so that CI runs the suite). Peak memory comes from
run_benchmark on a GPU. The DETR training loss is a stand-in (no Hungarian matching): it times the model. Inference
outputs are checked against the eager model in float64 (run_benchmark's `reference`)."""
import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from vitfast.models import CLIP, DETR, SwinTransformer, VisionTransformer, contrastive_loss
from vitfast.models.common import set_backend

from conftest import DEVICE, ON_GPU, mean_seconds, run_benchmark


@dataclass
class Spec:
    build: Callable  # () -> model
    batch: int
    inputs: Callable  # (batch) -> tuple of input tensors
    run: Callable  # (model, *inputs) -> output
    loss: Callable  # (output, *inputs) -> scalar


def _images(size, classes=1000):
    return lambda b: (torch.randn(b, 3, *size, device=DEVICE), torch.randint(0, classes, (b,), device=DEVICE))


def _classifier(build, batch, size):
    return Spec(build, batch, _images(size), lambda m, x, y: m(x), lambda out, x, y: F.cross_entropy(out, y))


def _detr_inputs(size):
    def make(b):
        mask = torch.ones(b, *size, dtype=torch.long, device=DEVICE)
        mask[1::2, :, size[1] * 3 // 4:] = 0  # every other image padded to the batch's width
        return torch.randn(b, 3, *size, device=DEVICE), mask
    return make


def _detr(build, batch, size):
    return Spec(build, batch, _detr_inputs(size), lambda m, x, mask: m(x, mask),
                lambda out, x, mask: out["pred_logits"].float().logsumexp(-1).mean() + out["pred_boxes"].float().mean())


def _clip(build, batch, size, ctx, vocab):
    def make(b):
        ids = torch.randint(1, vocab - 1, (b, ctx), device=DEVICE)
        ids[:, -1] = vocab - 1  # end-of-text token (the largest id) last
        return ids, torch.randn(b, 3, size, size, device=DEVICE)
    return Spec(build, batch, make, lambda m, ids, x: m(ids, x), lambda out, ids, x: contrastive_loss(out.logits_per_image))


if ON_GPU:
    MODELS = {
        "vit_b16": _classifier(lambda: VisionTransformer.from_size("base", 16), 128, (224, 224)),
        "deit_s16": _classifier(lambda: VisionTransformer.from_size("small", 16, distilled=True), 128, (224, 224)),
        "swin_t": _classifier(lambda: SwinTransformer.from_size("tiny"), 64, (224, 224)),
        "detr_r50": _detr(lambda: DETR(), 8, (800, 1216)),
        "clip_b16": _clip(lambda: CLIP(512, dict(patch_size=16)), 128, 224, 77, 49408),
    }
else:
    MODELS = {
        "vit_tiny": _classifier(lambda: VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2,
                                                          num_heads=2), 2, (64, 64)),
        "swin_tiny": _classifier(lambda: SwinTransformer(embed_dim=32, depths=(2, 2), num_heads=(2, 4)), 1, (56, 56)),
        "detr_tiny": _detr(lambda: DETR(num_classes=5, num_queries=10, d_model=32, nhead=2, num_encoder_layers=1,
                                        num_decoder_layers=1, dim_feedforward=64, backbone_depths=(1, 1, 1, 1),
                                        backbone_widths=(16, 16, 16, 32), backbone_stem_width=8), 2, (96, 128)),
        "clip_tiny": _clip(lambda: CLIP(16, dict(image_size=32, patch_size=8, width=32, layers=1, heads=2),
                                        dict(vocab_size=99, width=32, layers=1, heads=2)), 2, 32, 16, 99),
    }
IMPLS = ["vitfast", "sdpa", "eager", "sdpa+compile"]


def _model(name: str, impl: str):
    if impl.endswith("compile") and not ON_GPU:
        pytest.skip("torch.compile of a whole model takes minutes on a 2-core CPU")
    torch.manual_seed(0)
    model = set_backend(MODELS[name].build(), impl.split("+")[0]).to(DEVICE)
    return torch.compile(model) if impl.endswith("compile") else model


def _autocast():
    return torch.autocast("cuda", torch.bfloat16) if ON_GPU else torch.autocast("cpu", enabled=False)


def _eager_references(name: str) -> dict:
    """run_benchmark's reference and baseline for inference: the eager model (the same weights as _model's) in float64
    without autocast, and as benchmarked (in autocast on a GPU)."""
    spec = MODELS[name]
    torch.manual_seed(0)
    eager = set_backend(spec.build(), "eager").to(DEVICE).eval()
    double = copy.deepcopy(eager).double()

    def reference(*inputs):
        with torch.no_grad():
            return spec.run(double, *inputs)

    def baseline(*inputs):
        with torch.no_grad(), _autocast():
            return spec.run(eager, *inputs)
    return dict(reference=reference, baseline=baseline)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(MODELS))
def test_inference(benchmark, name, impl):
    spec = MODELS[name]
    model = _model(name, impl).eval()

    def run(*inputs):
        with torch.no_grad(), _autocast():
            return spec.run(model, *inputs)

    benchmark.group = f"{name} inference B={spec.batch}"
    run_benchmark(benchmark, run, lambda: spec.inputs(spec.batch), impl=impl, **_eager_references(name))
    benchmark.extra_info["images/s"] = spec.batch / mean_seconds(benchmark)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(MODELS))
def test_training_step(benchmark, name, impl):
    spec = MODELS[name]
    model = _model(name, impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(*inputs):
        with _autocast():
            loss = spec.loss(spec.run(model, *inputs), *inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    benchmark.group = f"{name} training step B={spec.batch}"
    run_benchmark(benchmark, step, lambda: spec.inputs(spec.batch), impl=impl)
    benchmark.extra_info["images/s"] = spec.batch / mean_seconds(benchmark)
