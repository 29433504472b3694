"""Reference Swin: vitfast backend against eager (torchvision's code) and sdpa, and against transformers."""
import copy

import pytest
import torch

import vitfast
from vitfast.models import SwinTransformer, swin_from_transformers
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


@pytest.mark.parametrize("kernel,device", KERNELS)
def test_swin_backends_agree(kernel, device):
    eager = SwinTransformer(backend="eager", **TINY)
    for p in eager.parameters():
        torch.nn.init.normal_(p, std=0.3)  # a trained-looking bias table and norms, not the zero/one init
    images = torch.randn(1, 3, 14, 14)
    weights = [torch.randn(1, 7, 7, 16), torch.randn(1, 4, 4, 32)]
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
    hf = transformers.SwinModel(config, add_pooling_layer=False).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    images = torch.randn(2, 3, 32, 32)
    ref = hf(pixel_values=images).last_hidden_state
    for backend in ("eager", "vitfast"):
        model = swin_from_transformers(hf, backend=backend)
        torch.testing.assert_close(model.forward_features(images)[-1].flatten(1, 2), ref, rtol=1e-4, atol=1e-4)


def test_swin_classifies_and_trains_like_eager():
    torch.manual_seed(0)
    eager = SwinTransformer(backend="eager", **TINY)
    mine = set_backend(copy.deepcopy(eager), "vitfast")
    images, labels = torch.randn(4, 3, 14, 14), torch.randint(0, 3, (4,))
    assert_trains_like_eager(eager, mine, lambda m: torch.nn.functional.cross_entropy(m(images), labels), steps=3, lr=1e-2)


def test_torchvision_state_dict_loads_as_is():
    from _optional_libs import import_or_skip

    tv_swin = import_or_skip("torchvision").models.swin_transformer
    theirs = tv_swin.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                     window_size=[4, 4], mlp_ratio=1.5, num_classes=3).eval()
    mine = SwinTransformer(**TINY).eval()
    mine.load_state_dict(theirs.state_dict())
    images = torch.randn(1, 3, 14, 14)
    torch.testing.assert_close(mine(images), theirs(images), rtol=1e-4, atol=1e-4)
