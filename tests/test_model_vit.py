"""Reference models: the vitfast backend against the eager and sdpa ones, and against transformers."""
import copy

import pytest
import torch

import vitfast
from vitfast.models import VisionTransformer, vit_from_transformers
from vitfast.models.common import set_backend

from _optional_libs import import_or_skip
from conftest import assert_trains_like_eager, backend_cases

# One kernel backend per model test keeps the interpreter's cost down: triton (interpreted) and cpp on CPU.
KERNELS = [c for c in backend_cases("attention") if c.values[0] != "torch"]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=1.5, num_classes=5)


def _grads(model, images, weights):
    model.zero_grad()
    out = model.forward_features(images)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel,device", KERNELS)
@pytest.mark.parametrize("distilled", [False, True])
def test_vit_backends_agree(kernel, device, distilled):
    eager = VisionTransformer(distilled=distilled, backend="eager", **TINY).to(device)
    images = torch.randn(2, 3, 32, 32, device=device)
    weights = torch.randn(2, 16 + (2 if distilled else 1), 32, device=device)
    ref_out, ref_grads = _grads(eager, images, weights)
    for backend in ("sdpa", "vitfast"):
        model = set_backend(copy.deepcopy(eager), backend)
        with vitfast.use_backend(kernel):
            out, grads = _grads(model, images, weights)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{backend} {name}: {m}")


def test_deit_heads_average_at_inference_and_split_in_training():
    model = VisionTransformer(distilled=True, backend="eager", **TINY)
    images = torch.randn(2, 3, 32, 32)
    cls, dist = model.train()(images)
    torch.testing.assert_close(model.eval()(images), (cls + dist) / 2)


@pytest.mark.parametrize("family", ["ViT", "DeiT"])
def test_weights_from_transformers(family):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{family}Config")(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                      intermediate_size=48, image_size=32, patch_size=8)
    hf = getattr(transformers, f"{family}Model")(config, add_pooling_layer=False).eval()
    for p in hf.parameters():  # transformers zero-initialises some; random values test the mapping
        torch.nn.init.normal_(p, std=0.2)
    images = torch.randn(2, 3, 32, 32)
    ref = hf(pixel_values=images).last_hidden_state
    for backend in ("eager", "vitfast"):
        model = vit_from_transformers(hf, backend=backend)
        torch.testing.assert_close(model.forward_features(images), ref, rtol=1e-4, atol=1e-4)
        # a base model converts headless (a random one-output head before): forward gives the class token, DeiT
        # the mean of its class and distillation tokens
        pooled = ref[:, 0] if family == "ViT" else (ref[:, 0] + ref[:, 1]) / 2
        torch.testing.assert_close(model.eval()(images), pooled, rtol=1e-4, atol=1e-4)
    assert vit_from_transformers(hf, num_classes=7).eval()(images).shape == (2, 7)
    with pytest.warns(UserWarning, match=r"the source's pooler \(a dense layer and tanh, its pooler_output\) is not"):
        vit_from_transformers(getattr(transformers, f"{family}Model")(config))  # (with its pooler, the default)
    with pytest.raises(ValueError, match=f"expects a ViTModel or DeiTModel, got {family}ForImageClassification"):
        vit_from_transformers(getattr(transformers, f"{family}ForImageClassification")(config))
    config.image_size = (32, 48)
    with pytest.raises(ValueError, match=r"vit_from_transformers takes a square image_size: .*\(32, 48\)"):
        vit_from_transformers(getattr(transformers, f"{family}Model")(config))


def test_loader_takes_a_compiled_model_and_square_size_pairs():
    """A torch.compile'd source or submodule (state dict keys with "_orig_mod.") failed with a bare KeyError, and an
    (n, n) image_size or patch_size, which transformers runs, was refused as not square."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                    image_size=[32, 32], patch_size=(8, 8))
    hf = transformers.ViTModel(config, add_pooling_layer=False).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    images = torch.randn(2, 3, 32, 32)
    ref = hf(pixel_values=images).last_hidden_state
    model = vit_from_transformers(torch.compile(hf), backend="eager")
    assert model.patch_embed.patch_size == 8
    torch.testing.assert_close(model.forward_features(images), ref, rtol=1e-4, atol=1e-4)
    # a compiled submodule (its keys hold "_orig_mod." inside) was a KeyError too; the source is left as it was
    compiled = torch.compile(hf.embeddings, backend="eager")
    hf.embeddings = compiled
    model = vit_from_transformers(hf, backend="eager")
    assert hf.embeddings is compiled and any("_orig_mod." in key for key in hf.state_dict())
    torch.testing.assert_close(model.forward_features(images), ref, rtol=1e-4, atol=1e-4)


def test_training_lowers_the_loss_like_eager():
    torch.manual_seed(0)
    eager = VisionTransformer(backend="eager", **TINY)
    mine = set_backend(copy.deepcopy(eager), "vitfast")
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    assert_trains_like_eager(eager, mine, lambda m: torch.nn.functional.cross_entropy(m(images), labels), steps=4, lr=1e-2)


def test_bad_backend_and_head_count():
    with pytest.raises(ValueError, match="unknown model backend 'fast'"):
        VisionTransformer(backend="fast", **TINY)
    with pytest.raises(ValueError, match="dim=32 must be divisible by num_heads=3"):
        VisionTransformer(**{**TINY, "num_heads": 3})
    # square pairs are taken, others refused (a TypeError about // on a tuple)
    assert VisionTransformer(**{**TINY, "patch_size": (TINY["patch_size"],) * 2}).patch_embed.patch_size == \
        TINY["patch_size"]
    with pytest.raises(ValueError, match=r"VisionTransformer takes a square img_size: a positive int or an \(n, n\) "
                                         r"pair, got \(32, 48\)"):
        VisionTransformer(**{**TINY, "img_size": (32, 48)})
    # sizes and head counts that built a model failing only in forward (or a ZeroDivisionError)
    np = pytest.importorskip("numpy")
    heads = VisionTransformer(**{**TINY, "num_heads": np.int64(2)}).blocks[0].attn.num_heads
    assert heads == 2 and type(heads) is int
    for bad, message in (({"num_heads": 0}, r"vitfast.models.vit.Attention: dim=32 must be divisible by num_heads=0, a "
                                            r"positive int"),
                         ({"img_size": -32}, "square img_size: a positive int"),
                         ({"patch_size": 0}, "square patch_size: a positive int"),
                         ({"img_size": 4}, "img_size 4 holds no 8x8 patch")):
        with pytest.raises(ValueError, match=message):
            VisionTransformer(**{**TINY, **bad})


def test_other_image_sizes_resample_pos_embed_like_timm():
    """The vitfast backend resamples the position embedding for another image size as timm's dynamic_img_size
    does, also where the new patch count equals the table's rows (a 48x24 image: 18 patches, the 2 + 16 rows of a
    distilled 32 px DeiT), which the op alone would read as a table without prefix rows."""
    from _optional_libs import import_or_skip

    timm = import_or_skip("timm")
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    theirs = timm.models.deit.VisionTransformerDistilled(**base, dynamic_img_size=True).double().eval()
    mine = VisionTransformer(**base, distilled=True).double().eval()
    mine.load_state_dict(theirs.state_dict())
    for size in ((40, 40), (48, 24)):
        images = torch.randn(2, 3, *size, dtype=torch.float64)
        torch.testing.assert_close(mine(images), theirs(images), rtol=1e-9, atol=1e-9)


def test_other_image_sizes_on_every_backend_and_too_small_images():
    """The eager and sdpa backends resample the position embedding for another image size as the vitfast backend
    does (they added the native-size table and failed); an image smaller than one patch raises a ValueError
    naming its shape (it failed inside the interpolation)."""
    base = dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=3, num_classes=5)
    models = {b: VisionTransformer(**base, backend=b).double().eval() for b in ("eager", "sdpa", "vitfast")}
    for m in models.values():
        m.load_state_dict(models["eager"].state_dict())
    images = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    ref = models["vitfast"](images)
    for name in ("eager", "sdpa"):
        torch.testing.assert_close(models[name](images), ref, rtol=1e-10, atol=1e-10)
        with pytest.raises(ValueError, match=r"at least one 8x8 patch, got \(1, 3, 4, 4\)"):
            models[name](torch.randn(1, 3, 4, 4, dtype=torch.float64))


def test_loader_refuses_other_models():
    """Another transformers family, or a module that is no transformers model: the loader's ValueError (an
    AttributeError on the config before)."""
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2],
                                                          num_heads=[2], window_size=4))
    with pytest.raises(ValueError, match="expects a transformers ViTModel or DeiTModel, got SwinModel"):
        vit_from_transformers(swin)
    with pytest.raises(ValueError, match="got Linear .not a transformers model"):
        vit_from_transformers(torch.nn.Linear(2, 2))
    # attention dropout, which transformers keeps as a float of the attention module, is warned about too
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=32, image_size=16, patch_size=8,
                                                       attention_probs_dropout_prob=0.1))
    with pytest.warns(UserWarning, match=r"vit_from_transformers: .*\(rates \[0.1\]\) are not carried over"):
        vit_from_transformers(vit)


def test_weights_from_transformers_keep_the_mlp_width():
    """An intermediate_size that hidden_size * (intermediate / hidden) rounds below (30 / 22 -> 29.99...) converts
    with fc1's width (the ratio truncated to 29 and the state dict did not load); a float64 model converts in
    float64 (it was loaded rounded to the default float32)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=22, num_hidden_layers=1, num_attention_heads=2, intermediate_size=30,
                                    image_size=16, patch_size=8)
    hf = transformers.ViTModel(config, add_pooling_layer=False).double().eval()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model = vit_from_transformers(hf)
    assert model.blocks[0].mlp.fc1.out_features == 30 and model.pos_embed.dtype == torch.float64
    torch.testing.assert_close(model.forward_features(images), hf(pixel_values=images).last_hidden_state)


@pytest.mark.parametrize("num_classes", [5, 0], ids=["head", "headless"])
@pytest.mark.parametrize("distilled", [False, True])
def test_timm_state_dict_loads_as_is(distilled, num_classes):
    """Also timm's headless models (num_classes=0: identity heads, the pooled tokens; a (B, 0) output before)."""
    from _optional_libs import import_or_skip

    timm = import_or_skip("timm")
    cls = timm.models.deit.VisionTransformerDistilled if distilled else timm.models.vision_transformer.VisionTransformer
    theirs = cls(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=1.5,
                 num_classes=num_classes).eval()
    mine = VisionTransformer(distilled=distilled, **{**TINY, "num_classes": num_classes}).eval()
    mine.load_state_dict(theirs.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(mine(images), theirs(images), rtol=1e-4, atol=1e-4)


def test_a_hook_on_the_patch_embedding_conv_runs_on_every_backend():
    """The vitfast backend read proj's weights for the fused embedding, so a hook on proj never ran there."""
    torch.manual_seed(0)
    eager = VisionTransformer(backend="eager", **TINY).eval()
    images, outputs = torch.randn(2, 3, 32, 32), []
    for backend in ("vitfast", "sdpa", "eager"):
        model = set_backend(copy.deepcopy(eager), backend)
        calls = []
        model.patch_embed.proj.register_forward_hook(lambda mod, args, out: calls.append(1) or out * 2)
        outputs.append(model(images))
        assert calls == [1], backend
    for out in outputs[:2]:
        torch.testing.assert_close(out, outputs[2], rtol=1e-5, atol=1e-5)


def test_compiled_model_takes_a_size_an_eager_call_resampled_before():
    """An eager call at another image size cached the pos-embed resampling matrix; compile(fullgraph=True)'s
    recompile for symbolic sizes then read it and failed ("pos_embed has 31 rows; expected 31 ...")."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = VisionTransformer(**{**TINY, "img_size": 16, "patch_size": 4}).eval()
    model(torch.randn(2, 3, 20, 24))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for size in ((16, 16), (20, 24), (28, 20)):
        images = torch.randn(2, 3, *size)
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)


def test_constructors_refuse_impossible_arguments():
    """A negative depth built an empty stack, a negative num_classes a headless model, a negative eps NaN outputs,
    in_chans=0 a convolution no image fits; from_size with an unknown name raised a bare KeyError."""
    from vitfast.models import SwinTransformer

    cases = [(lambda: VisionTransformer(**{**TINY, "depth": -2}), "depth"),
             (lambda: VisionTransformer(**{**TINY, "num_classes": -1}), "num_classes"),
             (lambda: VisionTransformer(**{**TINY, "eps": -1.0}), "eps must be positive"),
             (lambda: VisionTransformer(**{**TINY, "mlp_ratio": 0}), "mlp_hidden_dim"),
             (lambda: VisionTransformer(**{**TINY, "in_chans": 0}), "in_chans"),
             (lambda: VisionTransformer.from_size("medium"), r"one of \['tiny', 'small', 'base', 'large', 'huge'\]"),
             (lambda: SwinTransformer(depths=(-1, 2), num_heads=(1, 2)), r"depths\[0\]"),
             (lambda: SwinTransformer(num_classes=-3), "num_classes"),
             (lambda: SwinTransformer.from_size("large"), "one of")]
    for build, match in cases:
        with pytest.raises(ValueError, match=match):
            build()
    numpy = pytest.importorskip("numpy")  # (integer arguments of any integer type, a config's NumPy ints too)
    assert len(VisionTransformer(**{**TINY, "depth": numpy.int64(1), "embed_dim": numpy.int32(32),
                                    "img_size": numpy.int64(32)}).blocks) == 1


def test_distilled_parameters_in_timms_order():
    """An optimizer state saved on timm's distilled DeiT maps its tensors by position: dist_token was registered
    before pos_embed (timm's after), and the first step after resuming failed on a shape mismatch."""
    names = [n for n, _ in VisionTransformer(distilled=True, **TINY).named_parameters()]
    assert names[:3] == ["cls_token", "pos_embed", "dist_token"]
    timm = import_or_skip("timm")
    source = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                               embed_dim=32, depth=TINY["depth"], num_heads=2, num_classes=5)
    assert [n for n, _ in source.named_parameters()] == names
