"""DETR reference model: the vitfast backend against eager, and against transformers' DetrForObjectDetection."""
import copy

import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast.models import DETR, detr_from_transformers
from vitfast.models.common import set_backend
from vitfast.models.detr import ResNet, sine_position_embedding

from conftest import assert_trains_like_eager, backend_cases

KERNELS = [c for c in backend_cases("attention") if c.values[0] != "torch"]
TINY = dict(num_classes=3, num_queries=5, d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=2,
            dim_feedforward=48, dropout=0.0, backbone_depths=(1, 1, 1, 1), backbone_widths=(16, 16, 24, 32),
            backbone_stem_width=8)


def _padded_batch():
    """Two 64 x 96 images; the second is a 40 x 50 image padded at the bottom and right (2 x 3 feature map,
    of which the second image keeps 2 x 2 positions)."""
    images = torch.randn(2, 3, 64, 96)
    pixel_mask = torch.ones(2, 64, 96, dtype=torch.long)
    pixel_mask[1, 40:], pixel_mask[1, :, 50:] = 0, 0
    return images, pixel_mask


def _flat(out):
    return [out["pred_logits"], out["pred_boxes"]] + [t for aux in out["aux_outputs"] for t in aux.values()]


def _grads(model, images, pixel_mask, weights):
    model.zero_grad()
    out = _flat(model(images, pixel_mask))
    sum((o * w).sum() for o, w in zip(out, weights)).backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel,device", KERNELS)
def test_detr_backends_agree(kernel, device):
    eager = DETR(backend="eager", **TINY).to(device)
    images, pixel_mask = (t.to(device) for t in _padded_batch())
    # logits (3 + 1 classes) and boxes, final and aux
    weights = [torch.randn(2, 5, 4, device=device), torch.randn(2, 5, 4, device=device)] * 2
    ref_out, ref_grads = _grads(eager, images, pixel_mask, weights)
    assert len(ref_out) == 4, "one auxiliary output (first decoder layer) besides the final one"
    model = set_backend(copy.deepcopy(eager), "vitfast")
    with vitfast.use_backend(kernel):
        out, grads = _grads(model, images, pixel_mask, weights)
    for o, r in zip(out, ref_out):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and "backbone.layer4.0.conv2.weight" in grads
    assert "backbone.conv1.weight" not in grads and "backbone.layer1.0.conv1.weight" not in grads  # frozen, as DETR
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def _randomize(hf):
    """transformers zero-initialises biases and keeps LayerNorm/BatchNorm at identity, and its small init makes the
    object queries nearly identical: give every tensor but the backbone convs (kaiming init) random values."""
    with torch.no_grad():
        for name, t in hf.state_dict(keep_vars=True).items():
            if "backbone" in name and "convolution" in name:
                continue
            if "running_var" in name:
                t.uniform_(0.5, 2.0)
            elif "norm" in name and name.endswith("weight"):
                t.uniform_(0.5, 1.5)
            elif "normalization" in name or name.endswith("bias"):
                t.normal_(std=0.1)
            elif "query_position" in name:
                t.normal_(std=1.0)
            else:
                t.normal_(std=0.2)


def _hf_config(**overrides):
    """A tiny transformers DetrConfig with its ResNet backbone (two encoder and decoder layers)."""
    transformers = pytest.importorskip("transformers")
    return transformers.DetrConfig(**{**dict(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=dict(model_type="resnet", depths=[1, 1, 2, 1], hidden_sizes=[16, 24, 24, 32],
                             embedding_size=8, out_features=["stage4"]),
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=48, decoder_ffn_dim=48, num_queries=5, num_labels=3), **overrides})


def test_weights_from_transformers():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DetrForObjectDetection(_hf_config()).eval()
    _randomize(hf)
    images, pixel_mask = _padded_batch()
    with torch.no_grad():
        for mask in (None, pixel_mask):
            ref = hf(pixel_values=images, pixel_mask=mask)
            assert (ref.logits[:, 0] - ref.logits[:, 1]).abs().max() > 1e-2, "object queries must differ"
            for backend in ("eager", "vitfast"):
                out = detr_from_transformers(hf, backend=backend).eval()(images, mask)
                torch.testing.assert_close(out["pred_logits"], ref.logits, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(out["pred_boxes"], ref.pred_boxes, rtol=1e-4, atol=1e-4)
        unpadded = hf(pixel_values=images).logits[1]
        assert (unpadded - ref.logits[1]).abs().max() > 1e-2, "the pixel mask must matter"


def test_weights_from_transformers_keep_the_three_dropout_rates():
    """transformers' DETR has dropout (residual branches), attention_dropout and activation_dropout (after the ReLU);
    the converted model keeps each (it applied `dropout` to all three); DETR alone applies one rate to all three,
    as the original DETR."""
    transformers = pytest.importorskip("transformers")
    config = _hf_config(dropout=0.0, attention_dropout=0.5, activation_dropout=0.25)
    model = detr_from_transformers(transformers.DetrForObjectDetection(config))
    for layer in (model.transformer.encoder.layers[0], model.transformer.decoder.layers[0]):
        assert (layer.dropout, layer.self_attn.dropout, layer.activation_dropout) == (0.0, 0.5, 0.25)
    assert model.transformer.decoder.layers[0].multihead_attn.dropout == 0.5
    layer = DETR(**{**TINY, "dropout": 0.2}).transformer.decoder.layers[0]
    rates = (layer.dropout, layer.self_attn.dropout, layer.multihead_attn.dropout, layer.activation_dropout)
    assert rates == (0.2,) * 4


def test_weights_from_transformers_with_a_one_channel_backbone():
    """A backbone with num_channels = 1 (transformers runs it) failed in load_state_dict with a size mismatch."""
    transformers = pytest.importorskip("transformers")
    config = _hf_config()
    config.backbone_config.num_channels = 1
    hf = transformers.DetrForObjectDetection(config).eval()
    _randomize(hf)
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = hf(pixel_values=images)
        out = detr_from_transformers(hf)(images)  # (in the source's eval mode: its dropout ran before)
    torch.testing.assert_close(out["pred_logits"], ref.logits, rtol=1e-4, atol=1e-4)
    assert not detr_from_transformers(hf).training and detr_from_transformers(hf.train()).training
    # a malformed image: ValueError naming what is expected (a tuple unpacking or ATen's conv error before)
    model = detr_from_transformers(hf)
    for bad in (torch.randn(1, 64, 64), torch.randn(1, 3, 64, 64), torch.ones(1, 1, 64, 64, dtype=torch.long)):
        with pytest.raises(ValueError, match=rf"DETR expects floating-point images \(B, 1, H, W\), got "
                                             rf"\({', '.join(map(str, bad.shape))}\) {bad.dtype}"):
            model(bad)


def test_loader_warns_where_auxiliary_loss_changes_transformers_predictions():
    transformers = pytest.importorskip("transformers")
    with pytest.warns(UserWarning, match="auxiliary_loss is set"):
        detr_from_transformers(transformers.DetrForObjectDetection(_hf_config(auxiliary_loss=True)))


def test_loader_rejects_what_it_cannot_convert():
    transformers = pytest.importorskip("transformers")
    config = _hf_config(position_embedding_type="learned")
    with pytest.raises(ValueError, match="position_embedding_type = 'learned'"):
        detr_from_transformers(transformers.DetrForObjectDetection(config))
    with pytest.raises(ValueError, match="expects a DetrForObjectDetection .*got DetrModel"):
        detr_from_transformers(transformers.DetrModel(config))
    with pytest.raises(ValueError, match="got Linear .not a transformers model"):
        detr_from_transformers(torch.nn.Linear(2, 2))
    config = _hf_config(decoder_attention_heads=4)
    with pytest.raises(ValueError, match="encoder and decoder must have the same attention heads, got 2 and 4"):
        detr_from_transformers(transformers.DetrForObjectDetection(config))


def _detection_loss(out, labels, boxes):
    """A fixed matching (query i <-> object i) stands in for the Hungarian matcher: CE + L1 on every decoder layer."""
    return sum(F.cross_entropy(o["pred_logits"].flatten(0, 1), labels.flatten()) + F.l1_loss(o["pred_boxes"], boxes)
               for o in [out, *out["aux_outputs"]])


def test_training_lowers_the_loss_like_eager():
    eager = DETR(backend="eager", **TINY)
    mine = set_backend(copy.deepcopy(eager), "vitfast")
    images, pixel_mask = _padded_batch()
    labels, boxes = torch.randint(0, 4, (2, 5)), torch.rand(2, 5, 4)
    assert_trains_like_eager(eager, mine, lambda m: _detection_loss(m(images, pixel_mask), labels, boxes), steps=3, lr=1e-4)


def test_post_process_scores_labels_and_pixel_boxes():
    logits = torch.randn(2, 5, 4)
    boxes = torch.rand(2, 5, 4) * 0.5 + 0.25
    sizes = torch.tensor([[480, 640], [100, 200]])
    results = DETR.post_process({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    for i, r in enumerate(results):
        prob = logits[i].softmax(-1)
        torch.testing.assert_close(r["scores"], prob[:, :3].max(-1).values)
        torch.testing.assert_close(r["labels"], prob[:, :3].argmax(-1))
        h, w = sizes[i].tolist()
        cx, cy, bw, bh = boxes[i].unbind(-1)
        expected = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        torch.testing.assert_close(r["boxes"], expected)
    kept = DETR.post_process({"pred_logits": logits, "pred_boxes": boxes}, sizes, threshold=0.4)
    for r, k in zip(results, kept):
        assert torch.equal(k["scores"], r["scores"][r["scores"] > 0.4])


def test_sine_position_embedding_counts_valid_pixels_only():
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, :, 2:] = False
    pos = sine_position_embedding(mask, 8)
    assert pos.shape == (2, 16, 3, 4)
    torch.testing.assert_close(pos[1, :, :, :2], sine_position_embedding(mask[:1, :, :2], 8)[0])
    # normalized: the last valid row/column sits at 2 pi for every image size: sin(2 pi) of the first feature
    torch.testing.assert_close(pos[:, 0, -1], torch.zeros(2, 4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["vitfast", "sdpa", "eager"])
def test_empty_batch_with_and_without_pixel_mask(backend):
    """B = 0 gives (0, num_queries, ...) predictions, with a pixel_mask too (its resize raised on an empty batch)."""
    model = DETR(**TINY, backend=backend).eval()
    images = torch.randn(0, 3, 64, 64)
    for mask in (None, torch.ones(0, 64, 64, dtype=torch.long)):
        out = model(images, mask)
        assert out["pred_logits"].shape == (0, 5, 4) and out["pred_boxes"].shape == (0, 5, 4)


def test_default_backbone_is_resnet50():
    with torch.device("meta"):  # counting only: skips initialising 23M weights
        resnet = ResNet()
    frozen_bn_affine = sum(b.numel() for n, b in resnet.named_buffers() if n.endswith(("bn1.weight", "bn2.weight",
                                                                                       "bn3.weight", "1.weight")))
    params = sum(p.numel() for p in resnet.parameters())
    assert params + 2 * frozen_bn_affine == 23_508_032  # torchvision's resnet50 without its fc layer
    assert resnet(torch.randn(1, 3, 64, 96, device="meta")).shape == (1, 2048, 2, 3)


def test_head_counts_below_one_are_refused():
    """nhead=0 raised a ZeroDivisionError, nhead=-2 built a model failing in forward."""
    for nhead in (0, -2):
        with pytest.raises(ValueError, match=f"vitfast.models.detr.MultiheadAttention: dim=32 must be divisible by "
                                             f"num_heads={nhead}, a positive int"):
            DETR(**{**TINY, "nhead": nhead})
