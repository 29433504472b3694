"""CLIP reference model: the vitfast backend against eager, and against transformers' CLIPModel and open_clip's
CLIP."""
import copy
import re

import pytest
import torch

import vitfast
from vitfast.models import CLIP, clip_from_open_clip, clip_from_transformers, contrastive_loss
from vitfast.models.common import set_backend

from conftest import assert_trains_like_eager, backend_cases

KERNELS = [c for c in backend_cases("attention") if c.values[0] != "torch"]
VOCAB, EOS = 50, 49
TINY_VISION = dict(image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_dim=48)
TINY_TEXT = dict(vocab_size=VOCAB, context_length=12, width=32, layers=2, heads=2, mlp_dim=48, eos_token_id=EOS)


def _text_batch(eos: int = EOS):
    """Three captions of 7 slots: full, right-padded with pad id 1, padded with the eos id (as some tokenizers do);
    the attention mask also hides one token inside the first two captions, so the padding mask reaches the
    pooled token through the causal attention."""
    ids = torch.randint(3, eos - 1, (3, 7))
    ids[0, 6], ids[1, 4], ids[1, 5:], ids[2, 3:] = eos, eos, 1, eos
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 2], mask[1, 1], mask[1, 5:], mask[2, 4:] = 0, 0, 0, 0
    return ids, mask


def _grads(model, ids, mask, images, weights):
    model.zero_grad()
    out = model(ids, images, mask)
    sum((o * w).sum() for o, w in zip(out, weights)).backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel,device", KERNELS)
def test_clip_backends_agree(kernel, device):
    eager = CLIP(24, TINY_VISION, TINY_TEXT, backend="eager").to(device)
    ids, mask = (t.to(device) for t in _text_batch())
    images = torch.randn(2, 3, 16, 16, device=device)
    weights = [torch.randn(s, device=device) for s in ((2, 24), (3, 24), (2, 3), (3, 2))]
    ref_out, ref_grads = _grads(eager, ids, mask, images, weights)
    model = set_backend(copy.deepcopy(eager), "vitfast")
    with vitfast.use_backend(kernel):
        out, grads = _grads(model, ids, mask, images, weights)
    for name, o, r in zip(model(ids, images, mask)._fields, out, ref_out):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert grads.keys() == ref_grads.keys() and "logit_scale" in grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_left_padding_is_finite_on_every_backend():
    """A caption whose first tokens are padding: their rows see no key (causal and padding masks together);
    every backend gives them zeros, not NaN (eager's softmax gave NaN, which then reached every token)."""
    eager = CLIP(24, TINY_VISION, TINY_TEXT, backend="eager").eval()
    ids, mask = _text_batch()
    mask[0, :2] = 0
    outs, grads = {}, {}
    for b in ("eager", "sdpa", "vitfast"):
        model = set_backend(copy.deepcopy(eager), b)
        outs[b] = model.encode_text(ids, mask)
        grads[b] = torch.autograd.grad(outs[b].sum(), list(model.text.parameters()))
    assert torch.isfinite(outs["eager"]).all() and all(torch.isfinite(g).all() for g in grads["eager"])
    for b in ("sdpa", "vitfast"):
        torch.testing.assert_close(outs[b], outs["eager"], rtol=1e-5, atol=1e-5)
        for g, r in zip(grads[b], grads["eager"]):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_sdpa_backend_combines_causal_and_padding_masks():
    eager = CLIP(24, TINY_VISION, TINY_TEXT, backend="eager").eval()
    ids, mask = _text_batch()
    sdpa = set_backend(copy.deepcopy(eager), "sdpa")
    torch.testing.assert_close(sdpa.encode_text(ids, mask), eager.encode_text(ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eos,act", [(EOS, "quick_gelu"), (2, "gelu")])
def test_weights_from_transformers(eos, act):
    transformers = pytest.importorskip("transformers")
    shared = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, hidden_act=act)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=12, eos_token_id=eos, bos_token_id=0,
                         pad_token_id=1, **shared),
        vision_config=dict(image_size=16, patch_size=8, **shared), projection_dim=24)
    hf = transformers.CLIPModel(config).eval()
    for p in hf.parameters():  # transformers' init is small; larger random values test the mapping
        torch.nn.init.normal_(p, std=0.2)
    ids, mask = _text_batch()
    if eos == 2:  # the legacy rule pools at the largest token id: OpenAI's end-of-text is the last in the vocabulary
        ids[ids == EOS] = VOCAB - 1
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=images, attention_mask=mask)
        unmasked = hf(input_ids=ids, pixel_values=images)
        assert not torch.allclose(unmasked.text_embeds, ref.text_embeds, atol=1e-3), "the mask must matter"
        for backend in ("eager", "vitfast"):
            out = clip_from_transformers(hf, backend=backend).eval()(ids, images, mask)
            for name in out._fields:
                torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"{backend} {name}: {m}")


def test_training_lowers_the_loss_like_eager():
    eager = CLIP(24, TINY_VISION, TINY_TEXT, backend="eager")
    mine = set_backend(copy.deepcopy(eager), "vitfast")
    ids, mask = _text_batch()
    images = torch.randn(3, 3, 16, 16)
    assert_trains_like_eager(eager, mine, lambda m: contrastive_loss(m(ids, images, mask).logits_per_image), steps=4, lr=1e-2)


def test_contrastive_loss_is_symmetric_cross_entropy():
    logits = torch.randn(5, 5)
    x = logits.double()
    rows, cols = x.diag() - x.logsumexp(1), x.diag() - x.logsumexp(0)  # log-probability of the pair, both ways
    expected = -(rows.mean() + cols.mean()) / 2
    torch.testing.assert_close(contrastive_loss(logits), expected.float())
    for bad in (torch.randn(4, 3), torch.randn(4), torch.randn(0, 0), torch.ones(3, 3, dtype=torch.long)):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=rf"contrastive_loss expects square \(B, B\) .*got {shape} {bad.dtype}"):
            contrastive_loss(bad)


def test_bad_activation_and_too_long_text():
    with pytest.raises(ValueError, match="unsupported hidden_act 'relu'"):
        CLIP(24, TINY_VISION, {**TINY_TEXT, "hidden_act": "relu"})
    model = CLIP(24, TINY_VISION, TINY_TEXT, backend="eager")
    with pytest.raises(ValueError, match="13 tokens do not fit the context length 12"):
        model.encode_text(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="0 tokens do not fit"):  # (argmax of an empty row: an IndexError)
        model.encode_text(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expects input_ids \(B, N\), got \(5,\)"):  # (not enough values to unpack)
        model.encode_text(torch.zeros(5, dtype=torch.long))
    for mask in (torch.ones(2, 7), torch.ones(3, 6)):  # (an error naming an internal (B, 1, 1, N) view before)
        shape = re.escape(str(tuple(mask.shape)))
        with pytest.raises(ValueError, match=rf"attention_mask \(B, N\) = \(2, 6\) like input_ids, got {shape}"):
            model.encode_text(torch.zeros(2, 6, dtype=torch.long), mask)
    with pytest.raises(TypeError, match="attention_mask as a tensor \\(B, N\\), got list"):  # (an AttributeError)
        model.encode_text(torch.zeros(2, 6, dtype=torch.long), [[1] * 6] * 2)


def _open_clip(quick_gelu: bool):
    from _optional_libs import import_or_skip

    open_clip = import_or_skip("open_clip")
    vision = dict(image_size=16, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=1.5)
    text = dict(context_length=12, vocab_size=VOCAB, width=32, heads=2, layers=2, mlp_ratio=1.5)
    theirs = open_clip.model.CLIP(24, vision, text, quick_gelu=quick_gelu).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return theirs


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_weights_from_open_clip(quick_gelu):
    theirs = _open_clip(quick_gelu)
    # open_clip pads every caption to the context length with id 0 and pools at the largest id (the end of text)
    ids = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate((12, 7, 3)):
        ids[row, :n - 1] = torch.randint(1, VOCAB - 1, (n - 1,))
        ids[row, n - 1] = VOCAB - 1
    images = torch.randn(2, 3, 16, 16)
    ref_image, ref_text = theirs.encode_image(images), theirs.encode_text(ids)
    ref_logits = theirs.get_logits(images, ids)[0]
    for backend in ("eager", "vitfast"):
        mine = clip_from_open_clip(theirs, backend=backend).eval()
        torch.testing.assert_close(mine.encode_image(images), ref_image, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine.encode_text(ids), ref_text, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine(ids, images).logits_per_image, ref_logits, rtol=1e-4, atol=1e-4)


def test_open_clip_low_precision_model_converts_to_its_main_dtype():
    """open_clip's precision="bf16" keeps norms and embeddings in float32: the model came out all float32 (the dtype
    of its first parameter, positional_embedding), with twice the memory; now all bfloat16, with a warning."""
    theirs = _open_clip(False)  # (skips without open_clip)
    import open_clip

    open_clip.model.convert_weights_to_lp(theirs, torch.bfloat16)  # (what precision="bf16" runs)
    assert {p.dtype for p in theirs.parameters()} == {torch.bfloat16, torch.float32}
    images = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"clip_from_open_clip: the source's parameters are in several dtypes \(\d+ "
                                         r"elements bfloat16, \d+ float32\); the converted model is all bfloat16"):
        mine = clip_from_open_clip(theirs).eval()
    assert {p.dtype for p in mine.parameters()} == {torch.bfloat16}
    want = theirs.encode_image(images.bfloat16())
    got = mine.encode_image(images.bfloat16())
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


def test_loaders_refuse_other_models():
    """One tower, or the other library's CLIP: the loader's ValueError (an AttributeError before)."""
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8))
    with pytest.raises(ValueError, match="expects a transformers CLIPModel .both towers., got CLIPVisionModel"):
        clip_from_transformers(vision)
    with pytest.raises(ValueError, match="clip_from_open_clip expects an open_clip CLIP, got CLIPVisionModel"):
        clip_from_open_clip(vision)


def test_open_clip_variants_without_a_vitfast_layout_are_refused():
    theirs = _open_clip(True)
    theirs.logit_bias = torch.nn.Parameter(torch.zeros(()))  # SigLIP's
    with pytest.raises(ValueError, match="a logit bias"):
        clip_from_open_clip(theirs)
    theirs = _open_clip(True)
    theirs.text_projection = None  # proj_type="none"
    with pytest.raises(ValueError, match="no text projection"):
        clip_from_open_clip(theirs)
    # another tower: its reason alone (RN50's "no image projection", CoCa's "no text projection", "bidirectional")
    import open_clip

    text_cfg = dict(context_length=12, vocab_size=VOCAB, width=32, heads=2, layers=1)
    resnet = open_clip.model.CLIP(24, dict(image_size=32, layers=(1, 1, 1, 1), width=16, head_width=16), text_cfg)
    with pytest.raises(ValueError, match=r"does not convert: an image tower that is not open_clip's VisionTransformer$"):
        clip_from_open_clip(resnet)
    custom = open_clip.model.CustomTextCLIP(24, dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
                                            text_cfg)
    with pytest.raises(ValueError, match=r"does not convert: a text tower of its own class \(CustomTextCLIP\)$"):
        clip_from_open_clip(custom)
    # a text class embedding (CoCa's text config on a CLIP): a size mismatch in load_state_dict before
    vision_cfg = dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16)
    with_cls = open_clip.model.CLIP(24, vision_cfg, dict(text_cfg, embed_cls=True, pool_type="argmax"))
    with pytest.raises(ValueError, match=r"does not convert: a text class embedding \(embed_cls"):
        clip_from_open_clip(with_cls)
