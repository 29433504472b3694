"""Reference Swin (V1 and V2): vitfast backend against eager (torchvision's code) and sdpa, and against
torchvision, timm and transformers."""
import copy
import re

import pytest
import torch

import vitfast
from vitfast.models import SwinTransformer, swin_from_timm, swin_from_transformers
from vitfast.models.common import set_backend

from conftest import assert_trains_like_eager, backend_cases

KERNELS = [c for c in backend_cases("attention") if c.values[0] != "torch"]
# 14x14 images, patch 2: stage maps 7x7 (padded to 8x8, shifted windows) and 4x4 (one window, shift dropped).
TINY = dict(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4, mlp_ratio=1.5, num_classes=3)


def _grads(model, images, weights):
    model.zero_grad()
    feats = model.forward_features(images)
    sum((f * w).sum() for f, w in zip(feats, weights)).backward()
    return [f.detach() for f in feats], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("kernel,device", KERNELS)
def test_swin_backends_agree(kernel, device, v2):
    eager = SwinTransformer(backend="eager", v2=v2, **TINY)
    for p in eager.parameters():
        torch.nn.init.normal_(p, std=0.3)  # a trained-looking bias table and norms, not the zero/one init
    eager.to(device)
    images = torch.randn(1, 3, 14, 14, device=device)
    weights = [torch.randn(1, 7, 7, 16, device=device), torch.randn(1, 4, 4, 32, device=device)]
    ref_feats, ref_grads = _grads(eager, images, weights)
    for backend in ("sdpa", "vitfast"):
        model = set_backend(copy.deepcopy(eager), backend)
        with vitfast.use_backend(kernel):
            feats, grads = _grads(model, images, weights)
        for f, r in zip(feats, ref_feats):
            torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-4)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=2e-4,
                                       msg=lambda m: f"{backend} {name}: {m}")


def test_swin_state_dict_has_torchvision_names():
    keys = set(SwinTransformer(backend="eager", **TINY).state_dict())
    for k in ("features.0.0.weight", "features.0.2.bias", "features.1.0.attn.qkv.weight",
              "features.1.1.attn.relative_position_bias_table", "features.1.0.attn.relative_position_index",
              "features.1.0.mlp.0.weight", "features.1.0.mlp.3.bias", "features.2.reduction.weight",
              "features.2.norm.weight", "features.3.1.norm2.weight", "norm.weight", "head.bias"):
        assert k in keys, k


def test_weights_from_transformers():
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                     window_size=4)
    hf = transformers.SwinModel(config).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    images = torch.randn(2, 3, 32, 32)
    ref = hf(pixel_values=images)
    for backend in ("eager", "vitfast"):
        model = swin_from_transformers(hf, backend=backend)
        torch.testing.assert_close(model.forward_features(images)[-1].flatten(1, 2), ref.last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
        # headless by default (a random one-output head before): forward gives SwinModel's pooled output
        torch.testing.assert_close(model(images), ref.pooler_output, rtol=1e-4, atol=1e-4)
    assert swin_from_transformers(hf, num_classes=7)(images).shape == (2, 7)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_classifies_and_trains_like_eager(v2):
    torch.manual_seed(0)
    eager = SwinTransformer(backend="eager", v2=v2, **TINY)
    mine = set_backend(copy.deepcopy(eager), "vitfast")
    images, labels = torch.randn(4, 3, 14, 14), torch.randint(0, 3, (4,))
    assert_trains_like_eager(eager, mine, lambda m: torch.nn.functional.cross_entropy(m(images), labels), steps=3, lr=1e-2)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_torchvision_state_dict_loads_as_is(v2):
    from _optional_libs import import_or_skip

    tv_swin = import_or_skip("torchvision").models.swin_transformer
    kw = dict(block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2) if v2 else {}
    theirs = tv_swin.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                     window_size=[4, 4], mlp_ratio=1.5, num_classes=3, **kw).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.2)  # torchvision zero-initialises biases and the V2 key bias
    mine = SwinTransformer(v2=v2, **TINY).eval()
    mine.load_state_dict(theirs.state_dict())
    # (parameters in torchvision's order too, as an optimizer's state is matched to them by position)
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    images = torch.randn(1, 3, 14, 14)
    torch.testing.assert_close(mine(images), theirs(images), rtol=1e-4, atol=1e-4)


def test_weights_from_timm():
    from _optional_libs import import_or_skip

    timm = import_or_skip("timm")
    # 16x16 images, patch 2: maps 8x8 (shifted windows) and 4x4 (one window), multiples of the window as in every
    # standard config (on other maps timm rolls before padding, torchvision and vitfast pad before rolling).
    theirs = timm.models.swin_transformer.SwinTransformer(img_size=16, patch_size=2, embed_dim=16, depths=(2, 2),
                                                          num_heads=(2, 2), window_size=4, mlp_ratio=1.5,
                                                          num_classes=3).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.2)
    images = torch.randn(2, 3, 16, 16)
    ref = theirs(images)
    for backend in ("eager", "vitfast"):
        mine = swin_from_timm(theirs, backend=backend).eval()
        torch.testing.assert_close(mine(images), ref, rtol=1e-4, atol=1e-4)
    # built with strict_img_size=False, run at twice the size: timm's stage-2 blocks keep the shift 0 of their
    # build-time 4x4 map (the converted blocks alternated shifts: 4.5e-4 apart)
    theirs = timm.models.swin_transformer.SwinTransformer(img_size=16, patch_size=2, embed_dim=16, depths=(2, 2),
                                                          num_heads=(2, 2), window_size=4, mlp_ratio=1.5,
                                                          num_classes=3, strict_img_size=False).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(swin_from_timm(theirs).eval()(images), theirs(images))


def test_timm_per_stage_window_is_refused():
    from _optional_libs import import_or_skip

    timm = import_or_skip("timm")
    # 14x14 images, patch 2, window 7: stage 2's 4x4 map shrinks timm's window (and bias table) to 4x4.
    theirs = timm.models.swin_transformer.SwinTransformer(img_size=14, patch_size=2, embed_dim=16, depths=(2, 2),
                                                          num_heads=(2, 2), window_size=7, num_classes=3)
    with pytest.raises(ValueError, match=re.escape("windows per stage [(7, 7), (4, 4)] (one square window "
                                                   "everywhere converts; timm shrinks the window of a stage whose map "
                                                   "is smaller: a model built for images of at least 28 pixels keeps "
                                                   "7")):
        swin_from_timm(theirs)
    # non-square windows whose tables have a square number of rows: (5, 13) has 9 * 25 = 225 = 15 * 15, read as an
    # 8 x 8 window and converted with another model's outputs
    for window in [(5, 13), (1, 5)]:
        theirs = timm.models.swin_transformer.SwinTransformer(img_size=(10, 26), patch_size=2, embed_dim=16,
                                                              depths=(2,), num_heads=(2,), window_size=window)
        with pytest.raises(ValueError, match=r"windows per stage \[" + re.escape(str(window))
                           + r"\] \(one square window everywhere converts\)"):
            swin_from_timm(theirs)


def test_timm_variants_without_a_torchvision_layout_are_refused():
    """Configurations whose weights or windows torchvision's layout cannot hold raise, naming the setting (they
    loaded silently wrong, or raised IndexError / TypeError / a state-dict size mismatch)."""
    from _optional_libs import import_or_skip

    timm = import_or_skip("timm")
    base = dict(img_size=16, patch_size=2, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=3)
    swin = timm.models.swin_transformer.SwinTransformer
    for model, match in [(swin(embed_dim=16, always_partition=True, **base), "always_partition"),
                         (swin(embed_dim=16, head_dim=4, **base), "qkv width 24"),
                         (timm.models.swin_transformer_v2.SwinTransformerV2(embed_dim=16, **base),
                          "expects timm.models.swin_transformer.SwinTransformer, got .*SwinTransformerV2")]:
        with pytest.raises(ValueError, match=match):
            swin_from_timm(model)


def test_timm_mlp_ratio_and_global_pool():
    """timm's own mlp_ratio rebuilds every stage's fc1 width (1.37: int(22 * 30 / 22) was 29, not timm's 30, and
    the state dict did not load); a global_pool other than 'avg' raises (it converted and average-pooled)."""
    from _optional_libs import import_or_skip

    timm = import_or_skip("timm")
    swin = timm.models.swin_transformer.SwinTransformer
    base = dict(img_size=16, patch_size=2, depths=(2, 2), num_heads=(2, 2), window_size=4, num_classes=3)
    theirs = swin(embed_dim=22, mlp_ratio=1.37, **base).double().eval()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(swin_from_timm(theirs).eval()(images), theirs(images))  # (in float64: theirs)
    for pool in ("max", ""):
        with pytest.raises(ValueError, match=f"global_pool='{pool}' does not convert"):
            swin_from_timm(swin(embed_dim=16, global_pool=pool, **base))


def test_transformers_variants_that_do_not_convert_are_refused():
    transformers = pytest.importorskip("transformers")
    base = dict(image_size=32, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4)
    with pytest.raises(ValueError, match="use_absolute_embeddings=True"):
        swin_from_transformers(transformers.SwinModel(transformers.SwinConfig(patch_size=2,
                                                                              use_absolute_embeddings=True, **base)))
    with pytest.raises(ValueError, match=r"square patch_size.*\(2, 4\)"):
        swin_from_transformers(transformers.SwinModel(transformers.SwinConfig(patch_size=(2, 4), **base)))
    with pytest.raises(ValueError, match="expects a transformers SwinModel, got SwinForImageClassification"):
        swin_from_transformers(transformers.SwinForImageClassification(transformers.SwinConfig(patch_size=2,
                                                                                               **base)))
    # another family, or no transformers model at all: the loader's error (a KeyError or AttributeError before)
    with pytest.raises(ValueError, match="expects a transformers SwinModel, got Swinv2Model .model_type 'swinv2'"):
        swin_from_transformers(transformers.Swinv2Model(transformers.Swinv2Config(patch_size=2, **base)))
    with pytest.raises(ValueError, match="got Linear .not a transformers model"):
        swin_from_transformers(torch.nn.Linear(2, 2))


def test_dropped_drop_path_and_dropout_are_warned_about():
    """The converted model has no drop path or dropout: converting a model that has some says so (its training
    would silently differ), and one without converts quietly."""
    import warnings

    transformers = pytest.importorskip("transformers")
    base = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4)
    with pytest.warns(UserWarning, match=r"swin_from_transformers: .*drop path \(rates \[0.0667, 0.1333, 0.2\]\) are not"):
        swin_from_transformers(transformers.SwinModel(transformers.SwinConfig(drop_path_rate=0.2, **base)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swin_from_transformers(transformers.SwinModel(transformers.SwinConfig(drop_path_rate=0.0, **base)))


@pytest.mark.parametrize("backend", ["vitfast", "sdpa", "eager"])
def test_empty_batch(backend):
    """B = 0 gives (0, num_classes) on every model backend (the vitfast patch embedding's view raised)."""
    model = SwinTransformer(**TINY, backend=backend).eval()
    assert model(torch.randn(0, 3, 14, 14)).shape == (0, 3)


def test_bad_images_and_stage_lists_are_refused():
    """An unbatched image failed inside a tuple unpack; depths and num_heads of other lengths built fewer stages."""
    model = SwinTransformer(**TINY)
    for images in (torch.randn(3, 14, 14), torch.randn(1, 3, 14, 1)):
        with pytest.raises(ValueError, match=r"expects images \(B, C, H, W\) of at least one 2x2 patch, got "):
            model(images)
    with pytest.raises(ValueError, match=r"one depth and one head count per stage, got depths \(2, 2, 2\) and "
                                         r"num_heads \(2, 4\)"):
        SwinTransformer(embed_dim=16, depths=(2, 2, 2), num_heads=(2, 4))
    # torchvision's [7, 7] is taken, a non-square window refused (a TypeError about - on a list)
    SwinTransformer(**{**TINY, "window_size": [4, 4]})
    with pytest.raises(ValueError, match=r"SwinTransformer takes a square window_size: .* got \(4, 8\)"):
        SwinTransformer(**{**TINY, "window_size": (4, 8)})


@pytest.mark.parametrize("path", ["features.0.0", "features.0.2", "features.2.norm", "features.2.reduction"])
def test_hooks_on_the_fused_submodules_run_on_every_backend(path):
    """The vitfast backend read the patch embedding's conv and norm weights (their hooks never ran), the sdpa and
    eager backends PatchMerging's norm and reduction weights: a hook, or torch.nn.utils.prune's pre-hook, was skipped
    on some backends, so the backend switch changed the output (and pruned training failed on its second step)."""
    torch.manual_seed(0)
    eager = SwinTransformer(**TINY, backend="eager").eval()
    images, outputs = torch.randn(2, 3, 12, 12), []
    for backend in ("vitfast", "sdpa", "eager"):
        model = set_backend(copy.deepcopy(eager), backend)
        calls = []
        model.get_submodule(path).register_forward_hook(lambda mod, args, out: calls.append(1) or out * 2)
        outputs.append(model(images))
        assert calls == [1], backend
    for out in outputs[:2]:
        torch.testing.assert_close(out, outputs[2], rtol=1e-5, atol=1e-5)


def test_constructor_arguments_are_checked():
    """Windows of 0 or below, zero or negative head counts and patch sizes built models (or raised torch's
    "zeros: Dimension size must be non-negative", a ZeroDivisionError); a Swin-V2 window of 1 gave NaN outputs (its
    log-spaced coordinates divide by the window minus 1, as torchvision's do)."""
    for bad, message in (({"window_size": 0}, r"square window_size: a positive int or an \(n, n\) pair, got 0"),
                         ({"window_size": -3}, r"square window_size: a positive int"),
                         ({"num_heads": (0, 2)}, r"dim=16 must be divisible by num_heads=0, a positive int"),
                         ({"patch_size": 0}, r"square patch_size: a positive int"),
                         ({"window_size": 1, "v2": True}, r"window_size \(or pretrained_window_size\) must be at "
                                                          r"least 2 on each axis, got \[1, 1\]")):
        with pytest.raises(ValueError, match=message):
            SwinTransformer(**{**TINY, **bad})
    for make, message in ((lambda: vitfast.nn.ShiftedWindowAttention(32, [4.0, 4], [0, 0], 2),
                           r"nn.ShiftedWindowAttention: window_size must be an int or a pair of ints"),
                          (lambda: vitfast.nn.ShiftedWindowAttention(32, [4, 4], [0, 0], -2), "num_heads=-2"),
                          (lambda: vitfast.nn.WindowAttention(32, 0), "num_heads must be a positive int, got 0"),
                          (lambda: vitfast.nn.WindowAttention(32, 2, window_size=-3), "window_size must be positive"),
                          (lambda: vitfast.nn.PatchEmbed(32, 0, 3, 8), "patch_size must be positive, got 0"),
                          (lambda: vitfast.nn.PatchEmbed(32, 8, 3, 8).set_input_size(patch_size=0),
                           "vitfast.nn.PatchEmbed.set_input_size: patch_size must be positive, got 0"),
                          (lambda: vitfast.nn.PatchEmbed(32, 8, 3, 8).set_input_size(img_size=0),
                           "vitfast.nn.PatchEmbed: img_size must be positive, got 0"),
                          (lambda: vitfast.nn.PatchEmbed(-32, 8, 3, 8),
                           "vitfast.nn.PatchEmbed: img_size must be positive, got -32")):
        with pytest.raises(ValueError, match=message):
            make()
    assert vitfast.nn.ShiftedWindowAttention(32, 4, 2, 2).window_size == [4, 4]  # (an int, as the models take it)
    np = pytest.importorskip("numpy")  # (a NumPy head count kept as such failed torch.compile(dynamic=True))
    for module in (vitfast.nn.ShiftedWindowAttention(32, 4, 2, np.int64(2)),
                   vitfast.nn.WindowAttention(32, np.int64(2))):
        assert type(module.num_heads) is int


def test_loaders_refuse_layer_norms_without_bias():
    """timm Swin and open_clip towers whose LayerNorms have no bias raised a bare KeyError naming a state-dict key,
    where the loaders' docstrings promise a ValueError."""
    from functools import partial

    from _optional_libs import import_or_skip

    from vitfast.models import clip_from_open_clip

    timm_swin = import_or_skip("timm").models.swin_transformer
    model = timm_swin.SwinTransformer(img_size=56, embed_dim=24, depths=(2, 2), num_heads=(1, 2), num_classes=5,
                                      norm_layer=partial(torch.nn.LayerNorm, bias=False))
    with pytest.raises(ValueError, match="LayerNorms without an affine weight and bias"):
        swin_from_timm(model)
    open_clip = import_or_skip("open_clip")
    clip = open_clip.CLIP(embed_dim=24, vision_cfg=dict(layers=1, width=48, head_width=16, patch_size=8, image_size=32,
                                                        norm_kwargs=dict(bias=False)),
                          text_cfg=dict(context_length=12, vocab_size=99, width=40, heads=2, layers=1))
    with pytest.raises(ValueError, match="open_clip model does not convert: a LayerNorm without bias"):
        clip_from_open_clip(clip)
