"""`vitfast.patch_model` on the models people run: the original model, the patched model, in inference also the
model patched with `prepack_weights=True`, and torch.compile of the original, timed interleaved in one process (one round calls each once, in turn, the order reversed every other
round), with the medians, the ratio of the medians original / patched (> 1: patched faster) and the paired ratio
(the median over rounds of each round's original / patched: the two calls of a round run a few seconds apart, so
the slow drift of a shared VM's speed cancels) in extra_info.

Models (random weights): timm vit_base_patch16_224 and deit_small_patch16_224, torchvision swin_t, timm
swin_tiny_patch4_window7_224, Hugging Face CLIPVisionModel (the default config: ViT-B/32) and SwinModel (the default
config: Swin-T). Modes: inference under torch.inference_mode at batch 1 and 8, and one training step (forward,
backward, SGD step) at batch 2. In inference the patched and prepacked outputs are checked against the original
in float64 after the timing (conftest.check_accuracy; extra_info `patched_err_over_bound`, ...).

By default (CI, `make bench`) tiny configs of the same classes run in a few seconds and torch.compile is left out.
`VITFAST_BENCH_REAL=1` runs the real sizes (minutes per model on a 2-core CPU), with torch.compile unless
`VITFAST_BENCH_COMPILE=0`; `VITFAST_BENCH_THREADS` (default 2) sets torch's CPU threads and `VITFAST_BENCH_REPS`
(default 7 with VITFAST_BENCH_REAL=1, else 3) the rounds; other values than 1 or 0 for the flags, or than a whole
number >= 1 for the counts, are errors. The pytest-benchmark time of a test is that of one whole round.

    VITFAST_BENCH_REAL=1 python -m pytest bench/bench_patched_models.py --benchmark-only -q -s
"""
import copy
import os
import statistics
import sys

import pytest
import torch

import vitfast
from vitfast.report import timed_round

from conftest import DEVICE, ON_GPU, check_accuracy, env_count, env_flag

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from _optional_libs import import_or_skip  # noqa: E402  (the torchvision shim timm and torchvision need here)

REAL = env_flag("VITFAST_BENCH_REAL")
COMPILE = env_flag("VITFAST_BENCH_COMPILE", default=True) and REAL
REPS = env_count("VITFAST_BENCH_REPS", 7 if REAL else 3)
THREADS = env_count("VITFAST_BENCH_THREADS", 2)


def _timm(name, **tiny):
    def build():
        timm = import_or_skip("timm")
        return timm.create_model(name, pretrained=False, **({} if REAL else tiny))
    return build


def _torchvision_swin_t():
    import_or_skip("torchvision")
    from torchvision.models import swin_transformer as tvs

    if REAL:
        return tvs.swin_t()
    return tvs.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                               num_classes=5)


def _hf(model_cls, config_cls, **tiny):
    def build():
        transformers = pytest.importorskip("transformers")
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**({} if REAL else tiny)))
    return build


_TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)
# name -> (builder, image size)
MODELS = {
    "timm_vit_base_patch16_224": (_timm("vit_base_patch16_224", **_TINY_VIT), 224 if REAL else 32),
    "timm_deit_small_patch16_224": (_timm("deit_small_patch16_224", **_TINY_VIT), 224 if REAL else 32),
    "torchvision_swin_t": (_torchvision_swin_t, 224 if REAL else 16),
    "timm_swin_tiny_patch4_window7_224": (
        _timm("swin_tiny_patch4_window7_224", img_size=16, patch_size=2, embed_dim=16, depths=(2,), num_heads=(2,),
              window_size=4, num_classes=5), 224 if REAL else 16),
    "hf_clip_vision_b32": (_hf("CLIPVisionModel", "CLIPVisionConfig", hidden_size=32, intermediate_size=48,
                               num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
                           224 if REAL else 32),
    "hf_swin_tiny": (_hf("SwinModel", "SwinConfig", image_size=16, patch_size=2, embed_dim=16, depths=[2],
                         num_heads=[2], window_size=4), 224 if REAL else 16),
}
MODES = [("inference", 1), ("inference", 8), ("training", 2)]


def _tensor(out) -> torch.Tensor:
    """The model's main output: logits (timm, torchvision) or last_hidden_state (transformers)."""
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _infer(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return _tensor(model(x))


def _runner(model: torch.nn.Module, mode: str, x: torch.Tensor):
    if mode == "inference":
        model.eval()
        return lambda: _infer(model, x)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        _tensor(model(x)).float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


@pytest.fixture
def bench_threads():
    """Runs the test at THREADS threads and gives the session its own count back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(ON_GPU, reason="the CPU choice of vitfast.patch_model; GPU models are in bench_models.py")
@pytest.mark.usefixtures("bench_threads")
@pytest.mark.parametrize("mode,batch", MODES, ids=[f"{m}-b{b}" for m, b in MODES])
@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model(benchmark, name, mode, batch):
    torch.manual_seed(0)
    build, size = MODELS[name]
    original = build().to(DEVICE)
    patched = copy.deepcopy(original)
    report = vitfast.patch_model(patched)
    impls = {"original": original, "patched": patched}
    if mode == "inference":  # (prepacked weights serve calls without grad only)
        impls["prepacked"] = copy.deepcopy(original)
        vitfast.patch_model(impls["prepacked"], prepack_weights=True)
    if COMPILE:
        impls["compiled"] = torch.compile(copy.deepcopy(original))
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    runners = {k: _runner(m, mode, x) for k, m in impls.items()}
    for run in runners.values():  # warm-up (and compilation) outside the timing
        run()
    names, fns = list(runners), list(runners.values())
    rounds = [[] for _ in fns]

    def one_round():
        timed_round(fns, rounds, DEVICE, reverse=len(rounds[0]) % 2 == 1)

    benchmark.group = f"{name} {mode} B={batch}"
    benchmark.pedantic(one_round, rounds=REPS, iterations=1, warmup_rounds=0)
    times = dict(zip(names, rounds))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    paired = statistics.median(o / p for o, p in zip(times["original"], times["patched"]))
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, threads=torch.get_num_threads(), real=REAL,
                                mode=mode, batch=batch, reps=REPS, patched_kinds=report.counts(),
                                **{f"{k}_ms": v for k, v in ms.items()},
                                speedup_patched=ms["original"] / ms["patched"], speedup_patched_paired=paired)
    if "prepacked" in ms:
        benchmark.extra_info["speedup_prepacked_paired"] = statistics.median(
            o / p for o, p in zip(times["original"], times["prepacked"]))
    if COMPILE:
        benchmark.extra_info["speedup_compiled"] = ms["original"] / ms["compiled"]
    prepacked = (f" {ms['prepacked']:.1f} ({benchmark.extra_info['speedup_prepacked_paired']:.2f}x) |"
                 if "prepacked" in ms else " - |")
    print(f"\n| {name} | {batch} | {mode} | {ms['original']:.1f} | {ms['patched']:.1f} | "
          f"{ms['original'] / ms['patched']:.2f}x | {paired:.2f}x |" + prepacked
          + (f" {ms['compiled']:.1f} |" if COMPILE else ""))
    if mode == "inference":  # (after the timing and the printed row)
        double = copy.deepcopy(original).double()
        for key in ("patched", "prepacked"):
            check_accuracy(benchmark, f"vitfast-{key}", _infer(impls[key], x), (x,), lambda x: _infer(double, x),
                           lambda x: _infer(original, x), prefix=f"{key}_")
