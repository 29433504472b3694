"""vitfast.patch_model / unpatch_model on tiny timm, torchvision, open_clip and transformers models: outputs and every
parameter gradient equal before and after patching (fp32), state dicts unchanged (keys and values), unpatch restores
the original forward paths, and torch.compile(fullgraph=True) runs a patched model.

Each model runs with the Triton kernels (under TRITON_INTERPRET=1 without a GPU), with the C++ kernels forced, and
with the automatic choice (on CPU: ATen or vitfast per kind and mode, integrations/choice.py). timm, torchvision
and open_clip are optional: their tests skip with the reason where they do not import (see _optional_libs.py).
"""
import copy
import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import vitfast
from vitfast import backend as vf_backend
from vitfast.integrations import choice
from vitfast.integrations.patch import KINDS, PatchReport

from _optional_libs import import_or_skip


def _backends():
    # auto: on CPU, each kind runs what integrations/choice.py chose (ATen or vitfast's cpp kernel); cpp forces the
    # C++ kernels wherever the op has one (else torch); triton under TRITON_INTERPRET=1 without a GPU
    cases = [pytest.param("auto", id="auto")]
    if vf_backend._unavailable("attention", "cpp", torch.device("cpu")) is None and not torch.cuda.is_available():
        cases.append(pytest.param("cpp", id="cpp"))
    if vf_backend._unavailable("attention", "triton", torch.device("cpu")) is None or torch.cuda.is_available():
        cases.append(pytest.param("triton", id="triton"))
    return cases


BACKENDS = _backends()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _patched_equal(model: nn.Module, inputs, backend: str, pick=lambda o: o, atol: float = 2e-5, rtol: float = 1e-4,
                   device: str = DEVICE, **flags):
    """Patches a deep copy of `model`; checks outputs and gradients against the original, the state dict (keys and
    values), and that unpatching restores the original forward. Returns the report."""
    model = model.to(device).eval()
    mine = copy.deepcopy(model)
    report = vitfast.patch_model(mine, **flags)
    assert isinstance(report, PatchReport) and report.patched, str(report)
    linears = {n for n, m in mine.named_modules() if type(m) in _LINEAR_CLASSES} if flags.get("linear", True) else set()
    assert {p.name for p in report.patched if p.kind == "linear"} == linears, str(report)
    assert list(mine.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), model.state_dict().values()))

    out_e = pick(_run(model, inputs))
    weights = torch.randn_like(out_e)  # a random projection: a plain sum of LayerNorm outputs has ~no gradient
    (out_e * weights).sum().backward()
    with vitfast.use_backend(backend):
        out_m = pick(_run(mine, inputs))
        (out_m * weights).sum().backward()
    torch.testing.assert_close(out_m, out_e, rtol=rtol, atol=atol)
    for (name, p_e), (_, p_m) in zip(model.named_parameters(), mine.named_parameters()):
        assert (p_e.grad is None) == (p_m.grad is None), name
        if p_e.grad is not None:
            scale = p_e.grad.abs().max().item()
            torch.testing.assert_close(p_m.grad, p_e.grad, rtol=10 * rtol, atol=10 * atol * max(1.0, scale),
                                       msg=lambda m: f"{name}: {m}")

    restored = vitfast.unpatch_model(mine)
    assert restored >= len(report.patched)
    assert not any("_vitfast_patch" in m.__dict__ for m in mine.modules())
    with torch.no_grad():
        assert torch.equal(pick(_run(mine, inputs)), pick(_run(model, inputs)))
    return report


_LINEAR_CLASSES = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _kinds(report: PatchReport) -> dict:
    """Patched modules per kind, Linear layers apart (_patched_equal checks that every nn.Linear was patched)."""
    return {k: n for k, n in report.counts().items() if k != "linear"}


# ----------------------------------------------------------------------------------------------- timm

@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_vit(backend):
    timm = import_or_skip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, num_classes=5)
    report = _patched_equal(model, torch.randn(2, 3, 16, 16, device=DEVICE), backend)
    assert _kinds(report) == {"attention": 1, "layer_norm": 3, "patch_embed": 1, "linear_gelu": 1}, str(report)


def test_timm_vit_latent_attention_pool_is_left_with_why():
    timm = import_or_skip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, num_classes=5, global_pool="map")
    report = _patched_equal(model, torch.randn(2, 3, 16, 16, device=DEVICE), "auto")
    assert {l.name: l.reason for l in report.left} == {
        "attn_pool": "attention pooling with learned latent queries (global_pool='map'): its attention keeps timm's "
                     "path (its LayerNorm and MLP are patched)"}, str(report)
    assert {"attn_pool.norm", "attn_pool.mlp"} <= {p.name for p in report.patched}


def test_a_suspect_is_covered_only_by_what_its_name_suggests():
    """A class named like an attention module, with no adapter, is reported as left unless one of its submodules
    was patched as attention: a patched LayerNorm inside it does not cover its attention."""
    class PoolAttention(nn.Module):  # attention of its own, by hand, with a LayerNorm
        def __init__(self):
            super().__init__()
            self.norm, self.qkv = nn.LayerNorm(8), nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
            return (q @ k.transpose(-2, -1)).softmax(-1) @ v

    class WrapAttention(nn.Module):  # attention through a MultiheadAttention, which is patched
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    report = vitfast.patch_model(nn.Sequential(PoolAttention(), WrapAttention()))
    assert {p.name: p.kind for p in report.patched} == {"0.norm": "layer_norm", "0.qkv": "linear", "1.mha": "attention",
                                                        "1.mha.out_proj": "linear"}
    assert [(l.name, l.reason) for l in report.left] == [("0", "no vitfast adapter for this class")], str(report)
    alone = vitfast.patch_model(PoolAttention())  # the model itself is the suspect
    assert [(l.name, l.reason) for l in alone.left] == [("", "no vitfast adapter for this class")], str(alone)
    ClassAttn = type("ClassAttn", (PoolAttention,), {})  # timm's CaiT names ("...Attn") count too
    assert [l.name for l in vitfast.patch_model(nn.Sequential(ClassAttn())).left] == ["0"]
    # a block named like attention whose attention part is itself reported left is listed through that part only
    Block = type("LayerScaleBlockClassAttn", (nn.Module,), {})
    block = Block()
    block.attn = PoolAttention()
    assert [l.name for l in vitfast.patch_model(block).left] == ["attn"]


def test_timm_attention_variants_are_left_with_why():
    """Rotary (EVA-02, ViT rope), BEiT's relative position bias and CaiT's talking-heads and class attention were
    left as "no vitfast adapter for this class", CaiT's class-attention blocks listed besides their attention."""
    timm = import_or_skip("timm")
    kw = dict(img_size=16, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=5)
    for name, want in [("eva02_tiny_patch14_224", "rotary"), ("beit_base_patch16_224", "relative position bias"),
                       ("cait_xxs24_224", "talking heads|class attention")]:
        report = vitfast.patch_model(timm.create_model(name, pretrained=False, **kw))
        assert report.left and all(l.name.endswith("attn") and re.search(want, l.reason) for l in report.left), \
            str(report)


def test_attention_dropout_follows_the_flags_the_originals_read():
    """timm's attentions drop by their attn_drop Dropout (eager path) or their own training flag (SDPA path),
    transformers' Swin by its attention module's flag: with those in eval inside a training model the originals drop
    nothing, the patched ones dropped (they read the block's flag)."""
    timm = import_or_skip("timm")
    transformers = pytest.importorskip("transformers")
    x = torch.randn(2, 3, 16, 16)
    swin = dict(pretrained=False, img_size=16, patch_size=2, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4,
                num_classes=5, attn_drop_rate=0.5, drop_path_rate=0.0)
    hf = transformers.SwinModel(transformers.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2],
                                                        num_heads=[2], window_size=4, attention_probs_dropout_prob=0.5,
                                                        hidden_dropout_prob=0.0, drop_path_rate=0.0))
    eager_vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                                  attn_drop_rate=0.5, num_classes=5)
    eager_swin = timm.create_model("swin_tiny_patch4_window7_224", **swin)
    for attn in [blk.attn for blk in eager_vit.blocks] + [blk.attn for blk in eager_swin.layers[0].blocks]:
        attn.fused_attn = False  # (timm's eager path: the Dropout's flag decides; on the SDPA path the module's)
    cases = [(eager_swin, nn.Dropout), (timm.create_model("swin_tiny_patch4_window7_224", **swin), "WindowAttention"),
             (eager_vit, nn.Dropout), (hf, "SwinAttention")]
    for model, off in cases:
        patched = copy.deepcopy(model)
        vitfast.patch_model(patched)
        for m in (model, patched):
            m.train()
            for sub in m.modules():
                if isinstance(sub, off) if isinstance(off, type) else type(sub).__name__ == off:
                    sub.eval()
        with torch.no_grad(), vitfast.use_backend("cpp"):
            want = model(x)
            want = want.last_hidden_state if hasattr(want, "last_hidden_state") else want
            for seed in (1, 2):
                torch.manual_seed(seed)
                got = patched(x)
                got = got.last_hidden_state if hasattr(got, "last_hidden_state") else got
                torch.testing.assert_close(got, want, msg=lambda m: f"{type(model).__name__}, {off} in eval: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_swin(backend):
    timm = import_or_skip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=2,
                              embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, num_classes=5)
    batch = 1 if backend == "triton" else 2  # the interpreter runs one program at a time
    report = _patched_equal(model, torch.randn(batch, 3, 16, 16, device=DEVICE), backend)
    # each block's _attn (fused roll/partition/mask) and its WindowAttention; PatchEmbed fuses the norm
    assert _kinds(report) == {"window_attention": 4, "layer_norm": 6, "patch_embed": 1, "linear_gelu": 2}, str(report)


# ----------------------------------------------------------------------------------------------- torchvision

@pytest.mark.parametrize("backend", BACKENDS)
def test_torchvision_vit(backend):
    import_or_skip("torchvision")
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=48,
                              num_classes=5)
    report = _patched_equal(model, torch.randn(2, 3, 16, 16, device=DEVICE), backend)
    assert _kinds(report) == {"attention": 1, "layer_norm": 3, "patch_embed": 1, "linear_gelu": 1}, str(report)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torchvision_swin(backend, version):
    import_or_skip("torchvision")
    from torchvision.models import swin_transformer as tvs

    extra = dict(block=tvs.SwinTransformerBlockV2, downsample_layer=tvs.PatchMergingV2) if version == "v2" else {}
    model = tvs.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                                num_classes=5, **extra)
    # 8 x 8 patches in windows of 4 (the interpreter is slow), or 10 x 10 padded to 12 (the qkv bias at padding
    # pixels); the second block is shifted
    shape = (1, 3, 16, 16) if backend == "triton" else (2, 3, 20, 20)
    report = _patched_equal(model, torch.randn(*shape, device=DEVICE), backend)
    assert _kinds(report) == {"window_attention": 2, "layer_norm": 6, "linear_gelu": 2}, str(report)


def test_torchvision_swin_with_quantized_linears_is_left_with_the_reason():
    """quantize_dynamic swaps each nn.Linear for a quantized one, whose `weight` is a method: the window attention
    (it hands qkv.weight to the fused op) and the MLPs are left, with reasons naming the quantized class; before,
    the attention was reported patched and failed inside vitfast with an AttributeError."""
    import_or_skip("torchvision")
    from torchvision.models import swin_transformer as tvs

    model = tvs.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                                num_classes=5)
    model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    report = vitfast.patch_model(model)
    assert "window_attention" not in _kinds(report) and "linear_gelu" not in _kinds(report), str(report)
    reasons = {left.reason for left in report.left}
    assert "qkv is torch.ao.nn.quantized.dynamic.modules.linear.Linear, not torch.nn.Linear" in reasons, reasons
    assert "0 is torch.ao.nn.quantized.dynamic.modules.linear.Linear, not torch.nn.Linear" in reasons, reasons


# ----------------------------------------------------------------------------------------------- open_clip

@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip(backend):
    open_clip = import_or_skip("open_clip")
    vision = dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision,
                           text_cfg=dict(context_length=6, vocab_size=50, width=32, heads=2, layers=1))
    inputs = {"image": torch.randn(2, 3, 16, 16, device=DEVICE), "text": torch.randint(0, 50, (2, 6), device=DEVICE)}

    def pick(out):
        out = out if isinstance(out, (tuple, list)) else (out["image_features"], out["text_features"])
        return torch.cat([out[0], out[1]], -1)

    # the text tower's causal mask reaches nn.MultiheadAttention as a float (L, L) mask
    report = _patched_equal(model, inputs, backend, pick)
    assert _kinds(report) == {"attention": 2, "layer_norm": 7}, str(report)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip_attention_class(backend):
    import_or_skip("open_clip")
    from open_clip.transformer import Attention

    attn = Attention(32, num_heads=2)
    mask = torch.zeros(5, 5, device=DEVICE).masked_fill(torch.ones(5, 5, dtype=torch.bool, device=DEVICE).triu(1),
                                                         float("-inf"))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, attn_mask=mask)

    report = _patched_equal(Wrap(), torch.randn(2, 5, 32, device=DEVICE), backend)
    assert _kinds(report) == {"attention": 1}, str(report)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip_layer_norm_returns_its_inputs_dtype(backend):
    """open_clip's LayerNorm casts its output back to the input's dtype: under CUDA autocast a bfloat16 model's
    patched norm returned float32 (vitfast.layer_norm's rule there, F.layer_norm's). On CPU, whose autocast rule
    keeps the input's dtype, it checks that rule only: the fix shows on a GPU. (LayerNormFp32 of a bfloat16 model
    cannot run on CPU: F.layer_norm refuses its float32 input with bfloat16 weights.)"""
    import_or_skip("open_clip")
    from open_clip.transformer import LayerNorm

    norm = LayerNorm(16).to(DEVICE, torch.bfloat16)
    patched = copy.deepcopy(norm)
    assert _kinds(vitfast.patch_model(patched)) == {"layer_norm": 1}
    x = torch.randn(2, 5, 16, device=DEVICE, dtype=torch.bfloat16)
    with vitfast.use_backend(backend), torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, expected = patched(x), norm(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def test_multihead_attention_masks_and_layouts():
    """nn.MultiheadAttention's own conventions: bool True = masked out, key padding, seq-first, cross attention."""
    mha = nn.MultiheadAttention(32, 2, batch_first=False)
    q, kv = torch.randn(5, 2, 32), torch.randn(7, 2, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)
    ref = mha(q, kv, kv, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]
    float_mask = torch.zeros(5, 7).masked_fill(causal, float("-inf"))
    float_pad = torch.zeros(2, 7).masked_fill(pad, float("-inf"))
    ref_f = mha(q, kv, kv, key_padding_mask=float_pad, attn_mask=float_mask, need_weights=False)[0]
    report = vitfast.patch_model(mha)
    assert _kinds(report) == {"attention": 1}
    out, weights = mha(q, kv, kv, key_padding_mask=pad, attn_mask=causal, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    out_f = mha(q, kv, kv, key_padding_mask=float_pad, attn_mask=float_mask, need_weights=False)[0]
    torch.testing.assert_close(out_f, ref_f, rtol=1e-4, atol=2e-5)
    # need_weights=True: the original path, weights included
    assert mha(q, kv, kv, need_weights=True)[1] is not None


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_output_keeps_the_originals_memory_order(batch_first):
    """The output is in MultiheadAttention's own (L, B, E) memory order: a dropout after the module (torchvision's
    EncoderBlock) filled its mask for other elements than the original's under the same seed (outputs 0.3 apart),
    and with batch_first=False .view on the output failed where it works on the original's."""
    mha = nn.MultiheadAttention(16, 2, batch_first=batch_first, dropout=0.0).train()
    original = copy.deepcopy(mha)
    vitfast.patch_model(mha)
    x = torch.randn(3, 5, 16)
    for backend in ("cpp", "torch"):
        outs = []
        for module in (original, mha):
            torch.manual_seed(0)
            with vitfast.use_backend(backend):
                out = module(x, x, x, need_weights=False)[0]
            outs.append((out.stride(), F.dropout(out, 0.5)))
        (stride_want, want), (stride_got, got) = outs
        assert stride_got == stride_want, backend
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5, msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multihead_attention_fused_path_keeps_the_original_checks(backend):
    """On the fused path (a vitfast backend forced) masks of shapes MultiheadAttention refuses, and
    is_causal without a mask, raise the original's errors rather than being reinterpreted by a view."""
    mha = nn.MultiheadAttention(16, 2, batch_first=True).to(DEVICE)
    original = copy.deepcopy(mha)
    vitfast.patch_model(mha)
    q, kv = torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 4, 16, device=DEVICE)
    good = dict(attn_mask=torch.randn(3, 4, device=DEVICE), key_padding_mask=torch.rand(2, 4, device=DEVICE) > 0.7)
    bad = [dict(attn_mask=torch.zeros(4, 3, device=DEVICE)), dict(attn_mask=torch.zeros(5, 5, device=DEVICE)),
           dict(key_padding_mask=torch.zeros(4, 2, dtype=torch.bool, device=DEVICE)), dict(is_causal=True),
           # masks of dtypes it refuses (an integer padding mask is not read as an additive 0/1 mask)
           dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.long, device=DEVICE)),
           dict(attn_mask=torch.zeros(3, 4, dtype=torch.float64, device=DEVICE))]
    # inputs it refuses: another embed dim, key and value of different lengths
    bad_inputs = [(torch.randn(2, 3, 8, device=DEVICE), kv, kv), (q, kv, torch.randn(2, 5, 16, device=DEVICE))]
    with vitfast.use_backend(backend):
        torch.testing.assert_close(mha(q, kv, kv, need_weights=False, **good)[0],
                                   original(q, kv, kv, need_weights=False, **good)[0], rtol=1e-4, atol=2e-5)
        calls = [((q, kv, kv), kwargs) for kwargs in bad] + [(inputs, {}) for inputs in bad_inputs]
        for inputs, kwargs in calls:
            with pytest.raises((RuntimeError, AssertionError)) as theirs:
                original(*inputs, need_weights=False, **kwargs)
            with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value).split("\n")[0][:40])):
                mha(*inputs, need_weights=False, **kwargs)
        norm = nn.LayerNorm(16).to(DEVICE)
        patched_norm = copy.deepcopy(norm)
        vitfast.patch_model(patched_norm)
        with pytest.raises(RuntimeError) as theirs:
            norm(q[..., :8])
        with pytest.raises(RuntimeError, match=re.escape(str(theirs.value)[:40])):
            patched_norm(q[..., :8])


# ----------------------------------------------------------------------------------------------- transformers

@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_vit(backend):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                    image_size=16, patch_size=8)
    model = transformers.ViTModel(config, add_pooling_layer=False)
    model.set_attn_implementation("eager")
    report = _patched_equal(model, {"pixel_values": torch.randn(2, 3, 16, 16, device=DEVICE)}, backend,
                            lambda o: o.last_hidden_state)
    assert _kinds(report) == {"attention": 1, "layer_norm": 3, "patch_embed": 1, "linear_gelu": 1}, str(report)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ViT", "DeiT"])
def test_transformers_interpolated_size_not_a_multiple_of_the_patch(backend, name):
    """A drop-in is never stricter than what it replaces: at 44x36 with patch 8 the convolution drops the last 4
    rows and columns and the position embeddings are interpolated to the 5x4 grid; patched, the same."""
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{name}Config")(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=48, image_size=16, patch_size=8)
    model = getattr(transformers, f"{name}Model")(config, add_pooling_layer=False)
    model.set_attn_implementation("eager")
    inputs = {"pixel_values": torch.randn(2, 3, 44, 36, device=DEVICE), "interpolate_pos_encoding": True}
    report = _patched_equal(model, inputs, backend, lambda o: o.last_hidden_state)
    assert _kinds(report)["patch_embed"] == 1, str(report)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_swin_fused_layer(backend, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from vitfast.integrations import transformers as vt

    calls = []
    monkeypatch.setattr(vt, "window_attention", lambda *a, **k: calls.append(1) or vitfast.window_attention(*a, **k))
    # 6 x 6 patches, window 4: padded to 8 (qkv bias at padding pixels) and shifted in the second layer
    config = transformers.SwinConfig(image_size=12, patch_size=2, embed_dim=16, depths=[2], num_heads=[2],
                                     window_size=4)
    model = transformers.SwinModel(config, add_pooling_layer=False)
    model.set_attn_implementation("eager")
    batch = 1 if backend == "triton" else 2
    report = _patched_equal(model, {"pixel_values": torch.randn(batch, 3, 12, 12, device=DEVICE)}, backend,
                            lambda o: o.last_hidden_state)
    assert _kinds(report) == {"attention": 1, "window_attention": 2, "layer_norm": 6, "linear_gelu": 2}, str(report)
    assert len(calls) == 2  # both layers took the fused path (forward only; unpatched runs do not count)


def _swin_models():
    """Small Swin models of each library that is installed: (name, model, input, its features)."""
    models = []
    try:
        timm = import_or_skip("timm")
        models.append(("timm", timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16,
                                                 patch_size=2, embed_dim=16, depths=(2,), num_heads=(2,),
                                                 window_size=4, num_classes=5), torch.randn(2, 3, 16, 16),
                       lambda m, x: m.forward_features(x)))
    except pytest.skip.Exception:
        pass
    try:
        import_or_skip("torchvision")
        from torchvision.models import swin_transformer as tvs
        for extra in ({}, dict(block=tvs.SwinTransformerBlockV2, downsample_layer=tvs.PatchMergingV2)):
            models.append(("torchvision", tvs.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2],
                                                              num_heads=[2], window_size=[4, 4], num_classes=5,
                                                              **extra), torch.randn(2, 3, 16, 16),
                           lambda m, x: m.features(x)))
    except pytest.skip.Exception:
        pass
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2], num_heads=[2],
                                     window_size=4)
    models.append(("transformers", transformers.SwinModel(config, add_pooling_layer=False).eval(),
                   torch.randn(2, 3, 16, 16), lambda m, x: m(x).last_hidden_state))
    return models


class _VitfastOps(TorchDispatchMode):
    """The vitfast ops that ran (their names) while the mode was open."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vitfast":
            self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_swin_with_a_changed_relative_position_index_runs_its_original():
    """The fused window attention computes the relative position index from the window size and never read the
    modules' relative_position_index buffers: a Swin whose buffers were changed (an EMA of the model with
    AveragedModel(use_buffers=True) rounds the int64 index) gave other outputs than the original. Such a module
    runs its original forward, until its buffer holds the index again."""
    for library, model, x, features in _swin_models():
        def out(m, fused=None):
            with torch.no_grad(), _VitfastOps() as ops:
                y = features(m, x)
            if fused is not None:
                assert ("window_attention" in ops.names) == fused, (library, ops.names)
            return y
        model.eval()
        with torch.no_grad():  # (the libraries start the tables at std 0.02, where an index changes the output little)
            for n, p in model.named_parameters():
                if n.endswith("relative_position_bias_table"):
                    p.normal_()
        patched = copy.deepcopy(model)
        vitfast.patch_model(patched)
        before = out(model)
        torch.testing.assert_close(out(patched, fused=True), before, atol=2e-5, rtol=1e-4)
        buffers = [(n, b) for n, b in model.named_buffers() if n.endswith("relative_position_index")]
        assert buffers, library
        with torch.no_grad():
            for m in (model, patched):
                for n, b in m.named_buffers():
                    if n.endswith("relative_position_index"):
                        b.copy_(b.flip(0))
        changed = out(model)
        assert (changed - before).abs().max() > 0.01, library  # (the index matters: else this proves nothing)
        torch.testing.assert_close(out(patched, fused=False), changed, atol=2e-5, rtol=1e-4, msg=library)
        with torch.no_grad():
            for m in (model, patched):
                for n, b in m.named_buffers():
                    if n.endswith("relative_position_index"):
                        b.copy_(b.flip(0))
        torch.testing.assert_close(out(patched, fused=True), before, atol=2e-5, rtol=1e-4, msg=library)


def test_timm_swin_with_a_changed_attn_mask_runs_its_original():
    """The fused timm block computes the shift mask and never read the block's attn_mask buffer: a mask replaced
    (torch.func.functional_call) or changed in place gave the output of the mask timm built. Such a block runs timm's
    own attention, until its buffer holds that mask again."""
    from torch.func import functional_call

    timm = import_or_skip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=2,
                              embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, num_classes=5).eval()
    block = model.layers[0].blocks[1]
    assert block.shift_size == (2, 2) and block.attn_mask is not None
    patched = copy.deepcopy(block)
    vitfast.patch_model(patched)
    x = torch.randn(2, 8, 8, 16)

    def out(m, fused, buffers=None):
        with torch.no_grad(), _VitfastOps() as ops:
            y = m(x) if buffers is None else functional_call(m, buffers, (x,))
        assert ("window_attention" in ops.names) == fused, ops.names
        return y

    before = out(block, False)
    torch.testing.assert_close(out(patched, True), before, atol=1e-5, rtol=1e-4)
    unmasked = {"attn_mask": torch.zeros_like(block.attn_mask)}
    changed = out(block, False, unmasked)
    assert (changed - before).abs().max() > 1e-3  # (the mask matters: else this proves nothing)
    torch.testing.assert_close(out(patched, False, unmasked), changed, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out(patched, True), before, atol=1e-5, rtol=1e-4)
    saved = patched.attn_mask.clone()
    for m in (block, patched):
        m.attn_mask.zero_()
    torch.testing.assert_close(out(patched, False), out(block, False), atol=1e-5, rtol=1e-4)
    patched.attn_mask.copy_(saved)
    torch.testing.assert_close(out(patched, True), before, atol=1e-5, rtol=1e-4)


def test_swin_index_check_in_a_fake_mode_under_vmap_and_fx():
    """The index check (above) raised in a FakeTensorMode (DataDependentOutputException on aten.equal), under
    make_fx ("get value out of a tracing tensor"), with a default device (the index built there) and over a vmap of
    stacked models (no data pointer); fx's symbolic_trace of a patched timm Swin failed (its attention's real
    attn_mask hid the Proxy input from the guard); torch.jit.trace records the path the buffer gives."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functional_call, stack_module_state, vmap

    for library, model, x, features in _swin_models():
        model.eval()
        patched = copy.deepcopy(model)
        vitfast.patch_model(patched)
        with torch.no_grad():
            torch.testing.assert_close(make_fx(lambda z: features(patched, z))(x)(x), features(model, x),
                                       atol=2e-5, rtol=1e-4, msg=library)
            with torch.device("meta"):  # (the index check's first call; the originals run so)
                torch.testing.assert_close(features(copy.deepcopy(patched), x), features(model, x), atol=2e-5,
                                           rtol=1e-4, msg=library)
            for m in (model, patched):  # (a changed index: trace records the original path)
                for n, b in m.named_buffers():
                    if n.endswith("relative_position_index"):
                        b.copy_(b.flip(0))
            frozen = copy.deepcopy(patched).requires_grad_(False)  # (trace takes its weights as constants)
            traced = torch.jit.trace(lambda z: features(frozen, z), x, check_trace=False)
            torch.testing.assert_close(traced(x), features(model, x), atol=2e-5, rtol=1e-4, msg=library)
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            assert features(patched, mode.from_tensor(x)).shape == features(model, x).shape, library
        models = [copy.deepcopy(patched) for _ in range(2)]
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(patched).to("meta")
        def pick(y):
            return getattr(y, "last_hidden_state", y)
        with torch.no_grad():
            ensemble = vmap(lambda p, b: pick(functional_call(base, (p, b), (x,))))(params, buffers)
            torch.testing.assert_close(ensemble[1], pick(models[1](x)), atol=2e-5, rtol=1e-4, msg=library)
        if library == "timm":
            traced = torch.fx.symbolic_trace(patched)
            with torch.no_grad():
                torch.testing.assert_close(traced(x), patched(x), atol=2e-5, rtol=1e-4)


def test_transformers_model_patched_twice_reports_each_patched_module_once():
    """The second patch_model of a transformers model reported the model alone: its patched LayerNorms, Linears,
    MLPs and SwinLayers went unlisted (a timm model lists each)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=8, patch_size=2, embed_dim=16, depths=[2], num_heads=[2],
                                     window_size=2)
    model = transformers.SwinModel(config, add_pooling_layer=False)
    first = vitfast.patch_model(model)
    again = vitfast.patch_model(model)
    assert not again.patched
    names = [l.name for l in again.left if l.reason.startswith("already patched")]
    assert sorted(names) == sorted(p.name for p in first.patched) and len(set(names)) == len(names), str(again)
    assert [l for l in again.left if not l.reason.startswith("already patched")] == first.left, str(again)


# ----------------------------------------------------------------------------------------------- CPU choice

def test_choice_rule(monkeypatch):
    """The tables' answers. CPU: ATen for LayerNorm and attention, vitfast for patch embedding only with grad and an
    image that requires grad, vitfast for window attention, rel-pos attention and Linear layers, vitfast for
    linear_gelu only without grad and for outputs of 32 MiB or more (without the output's size, as the guard of a
    patched method asks: the table alone).
    CUDA: ATen for LayerNorm, attention, linear_gelu at any size and Linear layers, vitfast for the rest. A forced
    backend or a meta tensor always runs vitfast."""
    from torch._subclasses import fake_tensor

    x = torch.randn(2, 3)
    original = {"attention": True, "rel_pos_attention": False, "window_attention": False, "layer_norm": True}
    with torch.no_grad():
        assert ({k: choice.runs_original(k, x) for k in KINDS}
                == dict(original, patch_embed=True, linear_gelu=False, linear=False))
        assert not choice.runs_original("linear_gelu", x, out_bytes=2**25)  # 32 MiB outputs: fused
        assert choice.runs_original("linear_gelu", x, out_bytes=2**25 - 1)
    assert ({k: choice.runs_original(k, x) for k in KINDS}
            == dict(original, patch_embed=True, linear_gelu=True, linear=False))
    assert ({k: choice.runs_original(k, x.requires_grad_()) for k in KINDS}
            == dict(original, patch_embed=False, linear_gelu=True, linear=False))
    assert choice.runs_original("linear_gelu", x, out_bytes=2**25)  # with grad: ATen at any size
    # a CUDA tensor without a GPU (FakeTensorMode would allocate on the real device where CUDA is present)
    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda device: None)
    with fake_tensor.FakeTensorMode():
        gpu = torch.empty(2, 3, device="cuda")
    x = x.detach()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert ({k: choice.runs_original(k, gpu, out_bytes=2**30) for k in KINDS}
                    == dict(original, patch_embed=False, linear_gelu=True, linear=True))
    with vitfast.use_backend("torch"):
        assert not any(choice.runs_original(k, t) for k in KINDS for t in (x, gpu))
    assert not any(choice.runs_original(k, torch.empty(2, 3, device="meta")) for k in KINDS)
    assert set(choice.CHOICE) == {"cpu", "cuda"} and all(set(t) == set(KINDS) for t in choice.CHOICE.values())


@pytest.mark.parametrize("grad,image_grad", [(False, False), (True, False), (True, True)],
                         ids=["no_grad", "grad", "grad_image_grad"])
def test_cpu_choice_runs_the_original_code(grad, image_grad, monkeypatch):
    """Where the table says ATen, a patched timm ViT calls no vitfast op and its output is bitwise the original's;
    where it says vitfast (patch embedding with grad, of an image that requires grad), vitfast's op runs. The guard
    of a patched method asks the table first: only the modules whose kind the table gives vitfast in this mode (the
    MLP's linear_gelu without grad, whose output-size rule the adapter applies; the patch embedding with grad of an
    image that requires grad) get to the layout check."""
    timm = import_or_skip("timm")
    from vitfast.integrations import patch as vp
    from vitfast.integrations import timm as vt

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, num_classes=5).eval()
    mine = copy.deepcopy(model)
    report = vitfast.patch_model(mine, linear=False)  # (Linear layers run vitfast.linear in both modes)
    assert ("layer_norm: LayerNorm -> vitfast.layer_norm; on CPU and CUDA: original ATen code (faster there)"
            in str(report))
    assert "on CPU: vitfast with grad where the input (the image) requires grad, else the original" in str(report)
    calls = []
    for module, name in ((vp, "layer_norm"), (vp, "attention"), (vt, "attention")):
        monkeypatch.setattr(module, name, lambda *a, name=name, **k: calls.append(name))
    fused = vitfast.ops.patch_embed.patch_embed
    monkeypatch.setattr("vitfast.nn.patch_embed.patch_embed",
                        lambda *a, **k: calls.append("patch_embed") or fused(*a, **k))
    unchanged = vp._unchanged
    monkeypatch.setattr(vp, "_unchanged", lambda *a: calls.append("layout check") or unchanged(*a))
    x = torch.randn(2, 3, 16, 16, requires_grad=image_grad)
    fused_here = grad and image_grad
    with torch.set_grad_enabled(grad):
        out, expected = mine(x), model(x)
    assert calls == (["layout check", "patch_embed"] if fused_here else ["layout check"] if not grad else [])
    assert torch.allclose(out, expected, rtol=1e-4, atol=2e-5) if fused_here else torch.equal(out, expected)
    # keyword calls too: the guard finds the input among the keywords (the adapters leave the choice to it)
    calls.clear()
    tokens = torch.randn(2, 5, 32)
    with torch.set_grad_enabled(grad):
        norm, attn = mine.blocks[0].norm1(x=tokens), mine.blocks[0].attn(x=tokens)
        mine.patch_embed(x=x)
    assert calls == (["layout check", "patch_embed"] if fused_here else [])
    assert torch.equal(norm, model.blocks[0].norm1(x=tokens)) and torch.equal(attn, model.blocks[0].attn(x=tokens))


def _torchvision_vit():
    import_or_skip("torchvision")
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=48,
                              num_classes=5)
    return model, torch.randn(2, 3, 16, 16), lambda out: out


def _open_clip():
    open_clip = import_or_skip("open_clip")
    vision = dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision,
                           text_cfg=dict(context_length=6, vocab_size=50, width=32, heads=2, layers=1))
    inputs = {"image": torch.randn(2, 3, 16, 16), "text": torch.randint(0, 50, (2, 6))}
    return model, inputs, lambda out: torch.cat([out[0], out[1]], -1)  # image and text features


def _transformers_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                    image_size=16, patch_size=8)
    model = transformers.ViTModel(config, add_pooling_layer=False)
    model.set_attn_implementation("sdpa")
    return model, {"pixel_values": torch.randn(2, 3, 16, 16)}, lambda out: out.last_hidden_state


def _timm_vit():
    timm = import_or_skip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                             depth=1, num_heads=2, num_classes=5), torch.randn(2, 3, 16, 16), None


def test_timm_wrong_image_size_raises_timms_error_in_both_modes():
    """A patched timm PatchEmbed given an image size timm refuses raises timm's own error (AssertionError), with and
    without grad (with grad, where vitfast's op runs on CPU, it raised vitfast.nn.PatchEmbed's ValueError)."""
    model, _, _ = _timm_vit()
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)
    x = torch.randn(1, 3, 24, 24)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            with pytest.raises(AssertionError) as theirs:
                model(x)
            with pytest.raises(AssertionError, match=re.escape(str(theirs.value))):
                patched(x)


@pytest.mark.parametrize("build", [_timm_vit, _torchvision_vit])
def test_patch_embedding_given_other_channels_or_dtypes_raises_the_originals_error(build):
    """An image of another channel count or dtype than the patch convolution's raises conv2d's own error through a
    patched model, with grad too (where vitfast's op runs on CPU, it raised vitfast.patch_embed's ValueError)."""
    model, x, _ = build()
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)
    for bad in (torch.randn(1, 4, *x.shape[-2:]), x[:1].double(), x[:1].long()):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                with pytest.raises(RuntimeError) as theirs:
                    model(bad)
                with pytest.raises(RuntimeError, match=re.escape(str(theirs.value)[:60])):
                    patched(bad)
    with torch.autocast("cpu", dtype=torch.bfloat16), vitfast.use_backend("cpp"):  # (autocast casts no float64)
        with pytest.raises(RuntimeError) as theirs:
            model(x[:1].double())
        with pytest.raises(RuntimeError, match=re.escape(str(theirs.value)[:60])):
            patched(x[:1].double())


@pytest.mark.parametrize("build", [_timm_vit, _torchvision_vit])
def test_patch_convolution_of_another_geometry_runs_as_it_is(build):
    """A patch convolution swapped since patching for one with padding, another stride, a dilation or another kernel
    than the patch size (same class) ran as a plain patch embedding (torchvision's: 49 off with padding; transformers'
    alike): it runs its own call, also swapped in before patching (dilation was not checked)."""
    model, x, _ = build()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # (torchvision starts its head at zero: every output would be zero)
                p.normal_()
    for conv_args in (dict(stride=8, padding=1), dict(stride=8, padding=1, padding_mode="reflect"),
                      dict(stride=4), dict(stride=8, dilation=2), dict(kernel_size=4, stride=4)):
        for when in ("after", "before"):
            original = copy.deepcopy(model)
            patched = copy.deepcopy(model)
            if when == "after":
                vitfast.patch_model(patched)
            for m in (original, patched):
                name = "conv_proj" if hasattr(m, "conv_proj") else "patch_embed.proj"
                old = m.get_submodule(name)
                torch.manual_seed(1)
                m.set_submodule(name, nn.Conv2d(old.in_channels, old.out_channels,
                                                **{"kernel_size": old.kernel_size, **conv_args}))
            if when == "before":
                vitfast.patch_model(patched)
            image = x[:1].clone().requires_grad_()  # (with grad the patched embedding runs vitfast's op on CPU)
            try:
                expected = original(image)
            except RuntimeError as e:
                with pytest.raises(RuntimeError, match=re.escape(str(e)[:60])):
                    patched(image)
                continue
            torch.testing.assert_close(patched(image), expected, msg=f"{conv_args} {when}")


def test_timm_fast_norm_layer_norm_keeps_the_autocast_dtype():
    """A timm LayerNorm built after set_fast_norm(True) computes in the autocast dtype and returns it: patched, it
    does so on every backend (on a forced backend it returned float32); outside autocast it runs vitfast's op."""
    layers = import_or_skip("timm").layers
    layers.set_fast_norm(True)
    try:
        norm = layers.LayerNorm(16)
    finally:
        layers.set_fast_norm(False)
    patched = copy.deepcopy(norm)
    vitfast.patch_model(patched)
    x = torch.randn(2, 5, 16)
    for backend in ("cpp", "torch"):
        with vitfast.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            out = patched(x)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out, norm(x), rtol=0, atol=0)
    torch.testing.assert_close(patched(x), norm(x))


def test_jit_script_of_a_patched_model_raises_clearly():
    """torch.jit.script cannot compile the patched methods: it raises a clear error (it failed on a partial's missing
    __globals__), torch.jit.trace still works, and once unpatched the model scripts again."""
    model, x, _ = _torchvision_vit()
    model.eval()
    vitfast.patch_model(model)
    with pytest.raises(NotImplementedError, match="torch.jit.script cannot compile a model patched"):
        torch.jit.script(model)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:  # (trace's check re-traces without grad:
        warnings.simplefilter("always")                                     # with grad the CPU choice differs)
        torch.testing.assert_close(torch.jit.trace(model, x)(x), model(x))
    assert not [w for w in caught if "vitfast" in str(w.message)]
    # with grad the check failed with a long graph diff and no hint: a warning says why and what to do
    with pytest.warns(UserWarning, match=r"may fail .* trace under torch.no_grad\(\) .* or pass check_trace=False"):
        torch.testing.assert_close(torch.jit.trace(model, x, check_trace=False)(x), model(x))
    vitfast.unpatch_model(model)
    assert not any("__prepare_scriptable__" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


@pytest.mark.parametrize("make", [lambda: (vitfast.nn.LayerNorm(8), (2, 5, 8)),
                                  lambda: (vitfast.nn.PatchEmbed(16, 4, 3, 8), (2, 3, 16, 16)),
                                  lambda: (vitfast.nn.PatchMerging(8), (1, 6, 6, 8)),
                                  lambda: (vitfast.nn.ShiftedWindowAttentionV2(16, [3, 3], [1, 1], 2), (1, 6, 6, 16)),
                                  lambda: (vitfast.nn.WindowAttention(16, 2, window_size=3), (1, 6, 6, 16))],
                         ids=["LayerNorm", "PatchEmbed", "PatchMerging", "ShiftedWindowAttentionV2", "WindowAttention"])
def test_jit_script_of_a_vitfast_nn_module_raises_clearly(make):
    """The vitfast.nn modules failed inside TorchScript's compiler, with its errors (the modules they replace
    script): a clear error now; torch.jit.trace takes them."""
    module, shape = make()
    name = type(module).__name__
    with pytest.raises(NotImplementedError, match=f"torch.jit.script cannot compile vitfast.nn.{name} "):
        torch.jit.script(module)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.trace(module, x)(x), module(x))


def _mha():
    return nn.MultiheadAttention(16, 2, batch_first=True), torch.randn(2, 5, 16), None


def _vitfast_window_attention():
    return vitfast.nn.WindowAttention(16, 2, window_size=4), torch.randn(2, 16, 16), None


@pytest.mark.parametrize("build", [_timm_vit, _mha, _torchvision_vit, _vitfast_window_attention])
def test_empty_batch_on_the_fused_paths(build):
    """B = 0 through every patched attention path with a vitfast backend forced gives the
    original's empty output (a reshape to (B, N, heads, -1) cannot infer the -1 from 0 elements). (timm's Swin and
    open_clip, transformers' ViT and Swin fail at B = 0 themselves.)"""
    model, inputs, _ = build()
    model = model.to(DEVICE).eval()
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)

    def empty(x):
        return x[:0].to(DEVICE) if isinstance(x, Tensor) else x

    inputs = {k: empty(v) for k, v in inputs.items()} if isinstance(inputs, dict) else empty(inputs)

    def run(m):
        if isinstance(m, nn.MultiheadAttention):
            return m(inputs, inputs, inputs, need_weights=False)[0]
        out = _run(m, inputs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out

    forced = "cpp" if DEVICE == "cpu" and vf_backend._unavailable("attention", "cpp", torch.device("cpu")) is None \
        else "triton" if DEVICE != "cpu" else "torch"
    with torch.no_grad():
        ref = run(model)
        with vitfast.use_backend(forced):
            got = run(patched)
    assert got.shape == ref.shape and got.shape[0] == 0, (got.shape, ref.shape)


@pytest.mark.parametrize("build", [_torchvision_vit, _open_clip, _transformers_vit],
                         ids=["torchvision", "open_clip", "transformers"])
def test_cpu_choice_inference_is_the_original(build):
    """Without grad on CPU every kind these models patch but Linear layers (vitfast.linear: oneDNN) runs ATen
    (choice.py): the patched output is bitwise the original's (transformers: its SDPA attention path)."""
    model, inputs, pick = build()
    model.eval()
    mine = copy.deepcopy(model)
    assert vitfast.patch_model(mine, linear=False).patched
    with torch.inference_mode():
        assert torch.equal(pick(_run(mine, inputs)), pick(_run(model, inputs)))


# ----------------------------------------------------------------------------------------------- report, flags

def test_linear_layers_run_vitfast_linear_where_onednn_pays(monkeypatch):
    """A patched nn.Linear calls vitfast.linear, which runs oneDNN where its rule says it pays (M K N >= 2**25; with
    grad K and N >= 768) and F.linear below; outputs and gradients match the original model, with grad and
    without; prepack_weights=True packs the weights it runs on oneDNN, unpatch removes the flag; linear=False leaves
    the layers."""
    from vitfast.ops import linear as vl

    model = nn.Sequential(nn.Linear(768, 1024), nn.GELU(), nn.Linear(1024, 768), nn.Linear(768, 8)).eval()
    calls = []
    real = vl.onednn_linear
    monkeypatch.setattr(vl, "onednn_linear", lambda *a: calls.append(tuple(a[1].shape)) or real(*a))
    x = torch.randn(3, 100, 768)
    report = _patched_equal(model, x, "auto", atol=1e-4, rtol=1e-4, device="cpu")
    assert {p.name for p in report.patched} == {"0", "2", "3"}
    onednn = vf_backend.why_not("linear", "onednn", x, x) is None
    # the two forwards, then the backward's dx of layer 2 (its weight transposed; layer 0's input needs no grad)
    assert calls == ([(1024, 768), (768, 1024), (1024, 768)] if onednn else [])
    mine = copy.deepcopy(model)
    vitfast.patch_model(mine)
    calls.clear()
    with torch.inference_mode():
        torch.testing.assert_close(mine(x), model(x), rtol=1e-4, atol=1e-4)
    assert len(calls) == (2 if onednn else 0) and not any(id(p) in vl._PACKED for p in mine.parameters())
    packed = copy.deepcopy(model)
    vitfast.patch_model(packed, prepack_weights=True)
    calls.clear()
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), model(x), rtol=1e-4, atol=1e-4)
    assert len(calls) == (2 if onednn else 0)
    assert [id(packed[i].weight) in vl._PACKED for i in (0, 2)] == [onednn, onednn]
    vitfast.patch_model(packed)  # (prepack_weights=False again: the copies go)
    assert not any(id(p) in vl._PACKED for p in packed.parameters())
    vitfast.patch_model(packed, prepack_weights=True)
    with torch.inference_mode():
        packed(x)
    vitfast.unpatch_model(packed)
    assert not any("_vitfast_prepack" in m.__dict__ for m in packed.modules())
    assert not any(id(p) in vl._PACKED for p in packed.parameters())
    assert not vitfast.patch_model(copy.deepcopy(model), linear=False).counts().get("linear")


def test_flags_report_and_double_patch():
    model = nn.Sequential(nn.LayerNorm(8), nn.MultiheadAttention(8, 2, batch_first=True),
                          nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    report = vitfast.patch_model(model, attention=False)
    assert _kinds(report) == {"layer_norm": 1}
    reasons = {l.name: l.reason for l in report.left}
    assert reasons == {"1": "attention=False", "2": "attention=False"}
    again = vitfast.patch_model(model)
    assert _kinds(again) == {"attention": 1}
    assert "already patched" in {l.name: l.reason for l in again.left}["0"]
    assert "kdim/vdim" in {l.name: l.reason for l in again.left}["2"]
    assert "patched 0 (torch.nn.modules.normalization.LayerNorm)" in str(report)
    assert vitfast.unpatch_model(model) == 4  # (with the two MultiheadAttentions' out_proj Linears)
    assert vitfast.unpatch_model(model) == 0
    for fn in (vitfast.patch_model, vitfast.unpatch_model):  # (AttributeError: 'str' object has no attribute 'modules')
        with pytest.raises(TypeError, match=f"vitfast.{fn.__name__} takes an nn.Module, got str"):
            fn("model")
    for flag, value in (("prepack_weights", "yes"), ("attention", "False"), ("mlp", None), ("linear", 2)):
        with pytest.raises(TypeError, match=f"vitfast.patch_model: {flag} must be True or False, got {value!r}"):
            vitfast.patch_model(model, **{flag: value})
    np = pytest.importorskip("numpy")
    report = vitfast.patch_model(model, attention=np.bool_(False), linear=0)  # (values equal to a bool)
    assert _kinds(report) == {"layer_norm": 1}, str(report)


def test_a_forward_set_on_the_instance_is_left_as_it_is():
    """A forward set on the instance (accelerate's hooks, a user's wrapper, m.forward = torch.compile(m.forward)) is
    neither overwritten by patch_model nor deleted by unpatch_model."""
    norm = nn.LayerNorm(8)
    calls = []

    def wrapped(x):
        calls.append(1)
        return nn.LayerNorm.forward(norm, x)
    norm.forward = wrapped
    model = nn.Sequential(norm, nn.LayerNorm(8))
    report = vitfast.patch_model(model)
    assert [p.name for p in report.patched] == ["1"]
    assert [(l.name, l.reason) for l in report.left] == [
        ("0", "forward set on the instance (a wrapper's or a hook library's): left as it is")]
    vitfast.unpatch_model(model)
    model(torch.randn(2, 8))
    assert norm.forward is wrapped and calls == [1]


def test_layer_norm_subclass_with_own_forward_is_left():
    class ChannelsFirstNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    report = vitfast.patch_model(nn.Sequential(ChannelsFirstNorm(4)))
    assert not report.patched and "own forward" in report.left[0].reason


# ----------------------------------------------------------------------------------------------- torch.compile

def test_compile_fullgraph_patched_model():
    """A patched model compiles with fullgraph=True (no graph break from vitfast's ops) and matches eager."""
    timm = import_or_skip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, num_classes=5).eval()
    report = vitfast.patch_model(model)
    assert _kinds(report) == {"attention": 1, "layer_norm": 3, "patch_embed": 1, "linear_gelu": 1}
    x = torch.randn(2, 3, 16, 16)
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=2e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_compile_fullgraph_patched_mlp_on_onednn_without_grad():
    """A patched MLP whose products pass oneDNN's rule compiles with fullgraph=True without grad (the choices read no
    untraceable state), prepacked or not, and matches the original."""
    timm = import_or_skip("timm")
    mlp = timm.layers.Mlp(384, 1536).eval()
    x = torch.randn(1, 100, 384)
    for prepack in (False, True):
        mine = copy.deepcopy(mlp)
        vitfast.patch_model(mine, prepack_weights=prepack)
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(mine, fullgraph=True, backend="aot_eager")(x)
            torch.testing.assert_close(out, mlp(x), rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_patched_torchvision_swin():
    import_or_skip("torchvision")
    from torchvision.models import swin_transformer as tvs

    model = tvs.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                                num_classes=5).eval()
    vitfast.patch_model(model)
    x = torch.randn(1, 3, 16, 16)
    eager = model(x)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=2e-5)


def test_patched_model_pickles_and_deep_copies():
    """torch.save(model) and copy.deepcopy keep the patch, bound to the new module, not the old one."""
    import io

    model = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True).eval()
    vitfast.patch_model(model)
    x = torch.randn(2, 5, 16)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert clone.self_attn.forward.args[0] is clone.self_attn
        assert clone.norm1.forward.args[0] is clone.norm1
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
        assert vitfast.unpatch_model(clone) == 6  # (attention, 2 LayerNorms, out_proj and the 2 MLP Linears)


def test_mlp_with_hooks_or_swapped_layers_runs_its_own_calls():
    """A patched MLP runs fc1 and its activation through their own calls where they carry hooks (a forward hook,
    the old weight_norm's pre-hook) or were replaced after patching by something linear_gelu does not compute."""
    timm = import_or_skip("timm")
    mlp = timm.layers.Mlp(16, 48)
    original = copy.deepcopy(mlp)
    vitfast.patch_model(mlp)
    x = torch.randn(2, 5, 16)
    seen = []
    handle = mlp.act.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with vitfast.use_backend("cpp"):
        torch.testing.assert_close(mlp(x), original(x))
    assert seen == [(2, 5, 48)]
    handle.remove()
    torch.nn.utils.weight_norm(mlp.fc1)
    torch.nn.utils.weight_norm(original.fc1)
    with torch.no_grad():
        for m in (mlp, original):
            m.fc1.weight_g.mul_(2.0)
    with vitfast.use_backend("cpp"):
        torch.testing.assert_close(mlp(x), original(x))
    mlp.act = original.act = nn.ReLU()
    with vitfast.use_backend("cpp"):
        torch.testing.assert_close(mlp(x), original(x))


class _Scaled(nn.Module):
    """A wrapper standing in for a LoRA layer: the wrapped module's output, changed."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1.5


def test_hooks_and_swapped_submodules_take_the_original_path():
    """Patched modules read their submodules' parameters directly (a Swin block's qkv and proj, a patch
    embedding's conv, a LayerNorm fused into it): where such a submodule carries a hook that changes its output, or
    was wrapped after patching, the patched module runs its original forward, so the outputs, gradients and hook
    calls are the original model's (the hooks were skipped and the outputs differed)."""
    timm = import_or_skip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=2,
                              embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, num_classes=5).double().eval()
    original = copy.deepcopy(model)
    vitfast.patch_model(model)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)  # float64: rounding far below a skipped hook's effect
    calls = {"original": 0, "patched": 0}
    for key, m in (("original", original), ("patched", model)):
        for sub in (m.patch_embed.proj, m.patch_embed.norm, m.layers[0].blocks[1].attn.qkv):
            sub.register_forward_hook(lambda mod, i, o, key=key: calls.__setitem__(key, calls[key] + 1) or o * 1.5)
    with vitfast.use_backend("cpp"):
        out, grads = _run(model, images), torch.autograd.grad(_run(model, images).sum(), list(model.parameters()))
    ref, ref_grads = _run(original, images), torch.autograd.grad(_run(original, images).sum(),
                                                                 list(original.parameters()))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert calls["patched"] == calls["original"] > 0
    for m in (original, model):
        m.layers[0].blocks[0].attn.proj = _Scaled(m.layers[0].blocks[0].attn.proj)
    with vitfast.use_backend("cpp"):
        torch.testing.assert_close(_run(model, images), _run(original, images))


def test_forwards_set_on_submodule_instances_take_the_original_path():
    """A forward set on a submodule's instance (accelerate's add_hook_to_module, a wrapper that records attention
    maps) was skipped by the patched module, which reads the submodule's parameters (a wrapped patch-embedding conv:
    outputs 2.0 apart; a Swin block's attn.forward never called)."""
    timm = import_or_skip("timm")

    def wrap(module, calls):
        inner = module.forward

        def forward(*args, **kwargs):
            calls.append(1)
            return inner(*args, **kwargs) * 2.0
        module.forward = forward
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=2,
                              embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, num_classes=5).eval()
    original = copy.deepcopy(model)
    vitfast.patch_model(model)
    calls = {"original": [], "patched": []}
    for key, m in (("original", original), ("patched", model)):
        wrap(m.patch_embed.proj, calls[key])
        wrap(m.layers[0].blocks[1].attn, calls[key])
        wrap(m.layers[0].blocks[0].mlp.fc1, calls[key])
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    with vitfast.use_backend("cpp"):
        torch.testing.assert_close(_run(model, images), _run(original, images))
    assert len(calls["patched"]) == len(calls["original"]) == 3


def test_timm_modules_changed_or_given_what_the_original_refuses():
    """A patch embedding whose proj was replaced by a convolution of another geometry ran vitfast's op with the old
    one's assumptions (wrong tokens); an image smaller than a patch, an attention input that is not (B, N, C) and a
    Linear input of another width raised vitfast's errors where the original raises its own; a changed
    Attention.scale counted where timm's default fused path ignores it; timm's eager path (fused_attn=False) drops
    attn_mask under is_causal, the adapter applied both."""
    timm = import_or_skip("timm")
    from timm.layers import Attention, PatchEmbed

    embed = PatchEmbed(img_size=None, patch_size=8, embed_dim=16, strict_img_size=False)
    original = copy.deepcopy(embed)
    vitfast.patch_model(embed)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    embed.proj = nn.Conv2d(3, 16, 8, stride=4)
    original.proj = copy.deepcopy(embed.proj)
    with vitfast.use_backend("cpp"):
        torch.testing.assert_close(embed(images), original(images))
        with pytest.raises(RuntimeError) as want:
            original(images[..., :7, :9])
        with pytest.raises(RuntimeError, match=re.escape(str(want.value)[:40])):
            embed(images[..., :7, :9])
    attn = Attention(32, num_heads=2).eval()
    attn.scale = 0.5
    ref = copy.deepcopy(attn)
    vitfast.patch_model(attn)
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), vitfast.use_backend("cpp"):
        torch.testing.assert_close(attn(x), ref(x))
        for module, bad in ((attn, x[0]), (attn.qkv, x[..., :16])):
            original = ref if module is attn else ref.qkv
            with pytest.raises(Exception) as want:
                original(bad)
            with pytest.raises(type(want.value), match=re.escape(str(want.value)[:30])):
                module(bad)
        mask = torch.rand(2, 1, 5, 5) > 0.3
        for fused in (False, True):
            attn.fused_attn = ref.fused_attn = fused
            torch.testing.assert_close(attn(x, attn_mask=mask, is_causal=True), ref(x, attn_mask=mask, is_causal=True))
        # num_heads changed after construction: timm's reshape by head_dim fails; the adapter ran 4 heads of 8
        attn.num_heads = ref.num_heads = 4
        with pytest.raises(RuntimeError, match="shape .* is invalid"):
            ref(x)
        with pytest.raises(RuntimeError, match="don't multiply up"):
            attn(x)
    # timm's WindowAttention takes windows only: an image-layout map raised AttributeError (shift_size)
    from timm.models.swin_transformer import WindowAttention
    windows = WindowAttention(16, 2, window_size=4)
    ref = copy.deepcopy(windows)
    vitfast.patch_model(windows)
    with pytest.raises(Exception) as want:
        ref(torch.randn(1, 4, 4, 16))
    with vitfast.use_backend("cpp"), pytest.raises(type(want.value), match=re.escape(str(want.value)[:30])):
        windows(torch.randn(1, 4, 4, 16))


def test_swin_attention_subclasses_present_at_patch_time_are_left():
    """The fused Swin paths read the attention's weights and never call the attention module: a subclass there before
    patching (one that records attention maps; a LoRA Linear on transformers' q/k/v) was skipped silently (outputs
    0.06 apart). Such blocks are left, with the reason; MultiheadAttention's out_proj keeps the original's reading
    of its weights (a subclass's forward is not run by the original either)."""
    timm = import_or_skip("timm")
    transformers = pytest.importorskip("transformers")
    from timm.models.swin_transformer import WindowAttention

    class Recording(WindowAttention):
        def forward(self, x, mask=None):
            return super().forward(x, mask=mask) * 2.0
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=2,
                              embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, num_classes=5).eval()
    old = model.layers[0].blocks[1].attn
    model.layers[0].blocks[1].attn = Recording(16, 2, window_size=4)
    model.layers[0].blocks[1].attn.load_state_dict(old.state_dict())
    original = copy.deepcopy(model)
    report = vitfast.patch_model(model)
    assert any(left.name == "layers.0.blocks.1" and "not timm's WindowAttention" in left.reason
               for left in report.left), str(report)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))

    class Lora(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 0.5 * x[..., :1]
    config = transformers.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2], num_heads=[2],
                                     window_size=4)
    hf = transformers.SwinModel(config).eval()
    layer = hf.encoder.layers[0].blocks[0]
    lora = Lora(16, 16)
    lora.load_state_dict(layer.attention.q_proj.state_dict())
    layer.attention.q_proj = lora
    original = copy.deepcopy(hf)
    report = vitfast.patch_model(hf)
    assert any("q_proj not plain nn.Linear" in left.reason for left in report.left), str(report)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state,
                                   original(pixel_values=x).last_hidden_state, atol=2e-5, rtol=1e-4)

    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    out_proj = Lora(16, 16)
    out_proj.load_state_dict(mha.out_proj.state_dict())
    mha.out_proj = out_proj
    reference = copy.deepcopy(mha)
    vitfast.patch_model(mha)
    y = torch.randn(2, 5, 16)
    with torch.no_grad(), vitfast.use_backend("cpp"):
        torch.testing.assert_close(mha(y, y, y, need_weights=False)[0], reference(y, y, y, need_weights=False)[0],
                                   atol=2e-5, rtol=1e-4)


def test_data_parallel_replicas_run_their_own_parameters():
    """nn.DataParallel's replicas (torch.nn.parallel.replicate: a shallow copy, then the replica's own parameters)
    kept the patched methods bound to the source module, so each replica ran the source's parameters."""
    mlp = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    vitfast.patch_model(mlp)
    x = torch.randn(2, 8)
    for module in mlp:
        replica = module._replicate_for_data_parallel()
        replica.weight, replica.bias = torch.zeros_like(module.weight), torch.zeros_like(module.bias)
        with vitfast.use_backend("cpp"):
            assert torch.equal(replica(x), torch.zeros(2, 8)), type(module)
            assert not torch.equal(module(x), torch.zeros(2, 8))
    vitfast.unpatch_model(mlp)
    assert "_replicate_for_data_parallel" not in mlp[0].__dict__


def test_fx_symbolic_trace_of_a_patched_model():
    """torch.fx.symbolic_trace (timm's and torchvision's feature extractors) failed on the adapters' checks of a
    Proxy; the original code is traced."""
    timm = import_or_skip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=3).eval()
    original = copy.deepcopy(model)
    vitfast.patch_model(model)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), original(x))


def test_layout_check_sees_every_change_below_the_module():
    """The per-call check of a patched module's tree: unchanged until a submodule at any depth gets a hook, is
    replaced by one of another class, gains a child or is parametrized (which changes its class); removing the hook
    restores it, and a replacement of the same class (a fine-tuning head) keeps it. The layout holds no module: a
    replaced one is freed."""
    import gc
    import weakref

    from torch.nn.utils import parametrize
    from vitfast.integrations import patch as vp

    def tree():
        return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.LayerNorm(4), nn.GELU()))

    module = tree()
    layout = vp._layout(module)
    assert vp._unchanged(module, layout)
    handle = module[1][0].register_forward_pre_hook(lambda m, a: None)
    assert not vp._unchanged(module, layout)
    handle.remove()
    assert vp._unchanged(module, layout)
    old = weakref.ref(module[1][0])
    module[1][0] = nn.LayerNorm(4)
    gc.collect()
    assert vp._unchanged(module, layout) and old() is None
    for change in (lambda m: m[1].__setitem__(0, nn.Identity()), lambda m: m[1][1].add_module("extra", nn.ReLU()),
                   lambda m: parametrize.register_parametrization(m[0], "weight", nn.Identity()),
                   lambda m: delattr(m[1], "1")):
        module = tree()
        layout = vp._layout(module)
        change(module)
        assert not vp._unchanged(module, layout)


def test_patched_methods_take_the_originals_parameter_names():
    """A patched method is called as the original was, keywords included (`layer_norm(input=x)`, SamMLPBlock's
    `hidden_states=`): every adapter method has its class's parameter names, for each library installed here."""
    import importlib
    import inspect

    from vitfast.integrations import patch as vp

    checked = 0
    for qualname, adapter in vp._adapters().items():
        module, _, name = qualname.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError:
            continue
        for method, fn in adapter.methods.items():
            if hasattr(cls, method):
                original = list(inspect.signature(getattr(cls, method)).parameters)
                assert list(inspect.signature(fn).parameters) == original, (qualname, method)
                checked += 1
    assert checked >= 10
    norm = nn.LayerNorm(8)
    vitfast.patch_model(norm)
    # the bound method shows the original's signature, as torch.export's dynamic_shapes need ((*args, **kwargs) was
    # refused there)
    assert str(inspect.signature(norm.forward)) == "(input: torch.Tensor) -> torch.Tensor"
    torch.export.export(norm, (torch.randn(4, 8),), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    x = torch.randn(2, 8)
    with vitfast.use_backend("cpp"):
        torch.testing.assert_close(norm(input=x), nn.functional.layer_norm(x, (8,), norm.weight, norm.bias))
    timm = import_or_skip("timm")  # its LayerNorm names the input x (it raised TypeError when patched)
    norm = timm.layers.LayerNorm(8)
    vitfast.patch_model(norm)
    with vitfast.use_backend("cpp"):
        torch.testing.assert_close(norm(x=x), nn.functional.layer_norm(x, (8,), norm.weight, norm.bias, norm.eps))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_patched_models_run_on_meta_tensors(grad):
    """Shape inference on the meta device (as model-size tools run it) works on patched models as on the originals
    (the MLP's autocast query raised for a device without autocast)."""
    timm = import_or_skip("timm")
    for name, extra in (("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)),
                        ("swin_tiny_patch4_window7_224", dict(patch_size=2, embed_dim=16, depths=(2,), num_heads=(2,),
                                                              window_size=4))):
        model = timm.create_model(name, pretrained=False, img_size=16, num_classes=5, **extra).to("meta")
        x = torch.randn(2, 3, 16, 16, device="meta")
        with torch.set_grad_enabled(grad):
            expected = model(x)
            vitfast.patch_model(model)
            out = model(x)
        assert out.device.type == "meta" and out.shape == expected.shape == (2, 5)


def test_global_module_hooks_take_the_original_path():
    """A hook registered for every module (nn.modules.module.register_module_forward_hook, as module trackers and
    FLOP counters use) sees, and may change, the submodule calls that the patched modules skip: where one is
    registered, patched modules run their original forward."""
    timm = import_or_skip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, num_classes=5).double().eval()
    original = copy.deepcopy(model)
    vitfast.patch_model(model)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    seen = []

    def hook(module, args, out):
        seen.append(type(module).__name__)
        return out * 1.5 if isinstance(module, nn.Linear) else out
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with vitfast.use_backend("cpp"):
            out = _run(model, images)
        n_patched = len(seen)
        seen.clear()
        ref = _run(original, images)
    finally:
        handle.remove()
    torch.testing.assert_close(out, ref)
    assert n_patched == len(seen) and seen.count("Linear") == 5, seen


def test_cpu_choice_fuses_large_mlp_outputs_without_grad(monkeypatch):
    """On CPU without grad a patched MLP calls vitfast.linear_gelu exactly where fc1's output reaches 32 MiB (in
    the dtype autocast gives it), and matches the original there; with grad it runs the original calls. (With 2
    input features the product stays below oneDNN's rule, test_cpu_choice_fuses_mlps_on_onednn_without_grad.)"""
    timm = import_or_skip("timm")
    from vitfast.integrations import patch as vp

    mlp = timm.layers.Mlp(2, 4096).eval()
    original = copy.deepcopy(mlp)
    vitfast.patch_model(mlp)
    monkeypatch.setattr(vp, "mlp_chunk_rows", lambda *a: None)  # (the whole MLP in one call: fc1's rule alone)
    calls = []
    fused = vp.linear_gelu
    monkeypatch.setattr(vp, "linear_gelu", lambda *a, **k: calls.append(a[0].shape) or fused(*a, **k))
    big, small = torch.randn(2, 1024, 2), torch.randn(2, 1023, 2)  # 2048 x 4096 fp32 = 32 MiB; 8 KiB rows fewer
    with torch.no_grad():
        torch.testing.assert_close(mlp(big), original(big))
        mlp(small)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mlp(big)  # 16 MiB of bf16
    mlp(big)
    assert calls == [(2, 1024, 2)]


def _small_mlp(library: str):
    """A small MLP (8 -> 40 -> 8, GELU) of `library` whose adapter runs in row chunks, and its first Linear."""
    if library == "timm":
        m = import_or_skip("timm").layers.Mlp(8, 40)
        return m, m.fc1
    if library == "torchvision":
        import_or_skip("torchvision")
        from torchvision.ops import MLP

        m = MLP(8, [40, 8], activation_layer=nn.GELU, dropout=0.1)
        return m, m[0]
    transformers = pytest.importorskip("transformers")
    m = transformers.models.swin.modeling_swin.SwinMLP(transformers.SwinConfig(hidden_act="gelu", mlp_ratio=5.0), 8)
    return m, m.fc1


def _chunking_mlp(monkeypatch, library: str):
    """`_small_mlp(library)` in eval mode, patched, with choice.py's row-chunk constants shrunk so that 100 rows or
    more run in chunks of 30: (patched, unpatched copy, its fc1)."""
    mlp, fc1 = _small_mlp(library)
    mlp.eval()
    original = copy.deepcopy(mlp)
    vitfast.patch_model(mlp)
    monkeypatch.setattr(choice, "MLP_ROWS_MIN_HIDDEN_BYTES", 100 * 40 * 4)  # 100 rows of the hidden activation
    monkeypatch.setattr(choice, "MLP_ROWS_CHUNK_BYTES", 30 * 40 * 4)  # 30 rows a chunk
    return mlp, original, fc1


@pytest.mark.parametrize("library", ["timm", "torchvision", "transformers"])
def test_cpu_mlp_runs_in_row_chunks_without_grad(monkeypatch, library):
    """Without grad, in eval mode, on float32 CPU tensors a patched MLP whose hidden activation reaches choice.py's
    MLP_ROWS_MIN_HIDDEN_BYTES and whose parameters fit in MLP_ROWS_CHUNK_BYTES runs in chunks of rows (the last one
    shorter) and matches the original; with grad, in training mode, under autocast, for float64, below that hidden
    size or with larger parameters it runs in one call. (The constants are shrunk to test shapes.)"""
    from vitfast.integrations import timm as vtimm, torchvision as vtv, transformers as vhf

    mlp, original, fc1 = _chunking_mlp(monkeypatch, library)
    rows = []
    for module in (vtimm, vtv, vhf):
        monkeypatch.setattr(module, "mlp_fc1",
                            lambda x, *a, fc1=module.mlp_fc1: rows.append(x.numel() // 8) or fc1(x, *a))
    x = torch.randn(2, 3, 17, 8)  # 102 rows
    with torch.no_grad():
        out = mlp(x)
    assert rows == [30, 30, 30, 12]
    assert out.shape == (2, 3, 17, 8)
    torch.testing.assert_close(out, original(x))

    rows.clear()
    with torch.no_grad():
        mlp(x[:, :, :16])  # 96 rows: below the hidden size
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mlp(x)
    with vitfast.use_backend("torch"):  # (else with grad the guard runs the original forward)
        mlp(x)
    mlp.train()
    with torch.no_grad():
        mlp(x)
    mlp.eval()
    monkeypatch.setattr(choice, "MLP_ROWS_CHUNK_BYTES", fc1.weight.numel() * 4)  # less than all the parameters
    with torch.no_grad():
        mlp(x)
    assert rows == [96, 102, 102, 102, 102]

    double = copy.deepcopy(original).double()
    vitfast.patch_model(double)
    monkeypatch.setattr(choice, "MLP_ROWS_CHUNK_BYTES", 30 * 40 * 4)
    rows.clear()
    with torch.no_grad():
        torch.testing.assert_close(double(x.double()), original.double()(x.double()))
    assert rows == [102]


def test_compile_fullgraph_patched_mlp_where_it_would_run_in_chunks(monkeypatch):
    """Under torch.compile's tracing a patched MLP runs in one call (no chunk loop traced), with fullgraph=True, and
    matches the original."""
    mlp, original, _ = _chunking_mlp(monkeypatch, "timm")
    x = torch.randn(2, 51, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(mlp, fullgraph=True, backend="aot_eager")(x), original(x))


def test_mlp_traced_or_given_a_wrong_width_runs_in_one_call(monkeypatch):
    """torch.jit.trace of a patched MLP that would run in chunks records one call, so the trace is right at other
    batch sizes; an input of the wrong width raises the original's error, about the whole input, not a chunk."""
    mlp, original, _ = _chunking_mlp(monkeypatch, "timm")
    with torch.no_grad():
        traced = torch.jit.trace(mlp, torch.randn(2, 51, 8), check_trace=False)
        x = torch.randn(4, 51, 8)
        torch.testing.assert_close(traced(x), original(x))
        with pytest.raises(RuntimeError) as want:
            original(torch.randn(4, 51, 9))
        with pytest.raises(RuntimeError, match=re.escape(str(want.value))):
            mlp(torch.randn(4, 51, 9))


def test_cpu_choice_fuses_mlps_on_onednn_without_grad(monkeypatch):
    """On CPU without grad a patched MLP whose fc1 product passes oneDNN's rule calls vitfast.linear_gelu (oneDNN with
    GELU in the epilogue) at any output size, and matches the original; with grad, under autocast, or where oneDNN
    is missing it runs the original calls."""
    timm = import_or_skip("timm")
    from vitfast.integrations import patch as vp

    mlp = timm.layers.Mlp(384, 1536).eval()  # 200 x 384 -> 1536: 118M multiply-adds, a 1.2 MB output
    original = copy.deepcopy(mlp)
    vitfast.patch_model(mlp)
    calls = []
    fused = vp.linear_gelu
    monkeypatch.setattr(vp, "linear_gelu", lambda *a, **k: calls.append(a[0].shape) or fused(*a, **k))
    x = torch.randn(2, 100, 384)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), original(x), rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mlp(x)
    torch.testing.assert_close(mlp(x), original(x), rtol=1e-4, atol=1e-4)
    onednn = vf_backend.why_not("linear_gelu", "onednn", x, mlp.fc1.weight) is None
    assert calls == ([(2, 100, 384)] if onednn else [])


def test_flop_counter_counts_the_ops_as_their_references():
    """torch.utils.flop_counter.FlopCounterMode (fvcore-style FLOP counts of a model) counted 0 for vitfast's ops: a
    patched MLP reported 0 FLOPs for the original's 1.9e9. Each op's forward and backward now count as the plain
    PyTorch they replace (matmuls and convolutions; attention as torch counts SDPA's CUDA kernels, its backward with
    the recomputed scores, where the unfused reference counts four matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
    from vitfast.ops.attention import attention_ref
    from vitfast.ops.linear_gelu import linear_gelu_ref
    from vitfast.ops.patch_embed import patch_embed_ref
    from vitfast.ops.patch_merging import patch_merging_ref
    from vitfast.ops.rel_pos_attention import rel_pos_attention_ref
    from vitfast.ops.window_attention import window_attention_ref

    def flops(fn, *args):
        leaves = [a.detach().requires_grad_() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
        with FlopCounterMode(display=False) as fc:
            fn(*leaves).sum().backward()
        return fc.get_total_flops()

    x, w, b = torch.randn(64, 48), torch.randn(96, 48), torch.randn(96)
    images, pw = torch.randn(2, 3, 18, 17), torch.randn(16, 3, 4, 4)
    merge_x, nw, rw = torch.randn(2, 5, 7, 8), torch.randn(32), torch.randn(12, 32)
    qkv, table = torch.randn(2, 6, 7, 3, 2, 8), torch.randn(49, 2)
    with vitfast.use_backend("torch"):
        assert flops(vitfast.linear, x, w, b) == flops(F.linear, x, w, b) > 0
        assert flops(vitfast.linear_gelu, x, w, b) == flops(linear_gelu_ref, x, w, b)
        assert flops(lambda *a: vitfast.patch_embed(*a, 4), images, pw, None) == \
            flops(lambda *a: patch_embed_ref(*a, 4), images, pw, None) > 0
        assert flops(vitfast.patch_merging, merge_x, nw, nw, rw) == flops(patch_merging_ref, merge_x, nw, nw, rw) > 0
        assert flops(lambda *a: vitfast.window_attention(*a, 4, 2), qkv, table) == \
            flops(lambda *a: window_attention_ref(*a, 4, 2), qkv, table) > 0
        q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8)
        rel_h, rel_w = torch.randn(2, 3, 10, 3), torch.randn(2, 3, 10, 4)
        want = sdpa_flop_count(q.shape, k.shape, k.shape) + sdpa_backward_flop_count(q.shape, q.shape, k.shape, k.shape)
        assert flops(vitfast.attention, q, k, k) == flops(vitfast.rel_pos_attention, q, k, k, rel_h, rel_w) == want
        unfused = 3 * sdpa_flop_count(q.shape, k.shape, k.shape)
        assert flops(attention_ref, q, k, k) == flops(rel_pos_attention_ref, q, k, k, rel_h, rel_w) == unfused


@pytest.mark.parametrize("fused", [True, False])
def test_timm_changed_scale_counts_where_timm_reads_it(fused):
    """timm's fused attention path passes SDPA no scale (a changed `scale` counts on its eager path only): the
    patched Swin and SAM attention always applied the module's scale, off by 1-5% where timm's fused path ran."""
    timm = import_or_skip("timm")
    for model in (timm.create_model("samvit_base_patch16", pretrained=False, num_classes=5, img_size=64, embed_dim=32,
                                    depth=2, num_heads=2),
                  timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=2,
                                    embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, num_classes=5)):
        model.eval()
        for module in model.modules():
            if hasattr(module, "fused_attn") and hasattr(module, "scale"):
                module.scale, module.fused_attn = 0.05, fused
        patched = copy.deepcopy(model)
        vitfast.patch_model(patched)
        x = torch.randn(2, 3, *model.patch_embed.img_size)
        with torch.no_grad():
            expected = model(x)
            for backend in ("auto", "cpp"):
                with vitfast.use_backend(backend):
                    torch.testing.assert_close(patched(x), expected, atol=1e-5, rtol=1e-4, msg=backend)


def test_open_clip_changed_scale_counts_where_open_clip_reads_it():
    """open_clip's SDPA path (use_fsdpa, its default) passes no scale (a changed `scale` counts on its other path
    only, which open_clip 3.3 cannot run: a 4-D bmm): the patched attention always applied it (2.4 off on a forced
    backend)."""
    import_or_skip("open_clip")
    from open_clip.transformer import Attention

    attn = Attention(64, num_heads=4).eval()
    attn.scale = 0.05
    patched = copy.deepcopy(attn)
    vitfast.patch_model(patched)
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        expected = attn(x)
        for backend in ("auto", "cpp", "torch"):
            with vitfast.use_backend(backend):
                torch.testing.assert_close(patched(x), expected, atol=1e-5, rtol=1e-4, msg=backend)


def test_unpatch_keeps_a_forward_set_since_patching():
    """unpatch_model deleted a forward a user (or a library's hooks: accelerate's partial of the module) set on a
    patched module's instance after patching: the wrapper vanished. It is kept; vitfast's own methods go."""
    model, x, _ = _timm_vit()
    model.eval()
    vitfast.patch_model(model)
    attn = model.blocks[0].attn
    seen = []
    inner = attn.forward

    def recording_forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        seen.append(out.shape)
        return out

    attn.forward = recording_forward
    mlp = model.blocks[0].mlp
    patched_mlp = mlp.forward

    def hooked_forward(module, *args, **kwargs):  # (accelerate's and diffusers' hooks: partial(new_forward, module))
        seen.append("hook")
        return patched_mlp(*args, **kwargs)

    mlp.forward = functools.partial(hooked_forward, mlp)
    model(x)
    vitfast.unpatch_model(model)
    assert attn.__dict__.get("forward") is recording_forward and mlp.__dict__["forward"].func is hooked_forward
    assert "forward" not in model.blocks[0].norm1.__dict__ and not any("vitfast" in k for k in attn.__dict__)
    model(x)
    assert len(seen) == 4


def test_attention_of_heads_wider_than_the_op_is_left_with_why():
    """vitfast.attention takes head dims up to 256 on every backend: a wider attention (nn.MultiheadAttention, timm's
    and open_clip's Attention) was reported patched, and every call raised under a forced backend. It is left, with
    the reason, and runs its own code."""
    modules = {"mha": nn.MultiheadAttention(600, 2, batch_first=True)}
    try:
        timm = import_or_skip("timm")
        modules["timm"] = timm.models.vision_transformer.Attention(600, num_heads=2)
    except pytest.skip.Exception:
        pass
    try:
        open_clip = import_or_skip("open_clip")
        modules["open_clip"] = open_clip.transformer.Attention(600, num_heads=2)
    except pytest.skip.Exception:
        pass
    x = torch.randn(2, 5, 600)
    for name, module in modules.items():
        module.eval()
        call = (lambda m: m(x, x, x)[0]) if name == "mha" else (lambda m: m(x))
        expected = call(module)
        report = vitfast.patch_model(module, linear=False)
        left = {l.name: l.reason for l in report.left}
        assert left[""] == "head dim 300 > 256 (vitfast.attention takes 1..256)", str(report)
        assert "attention" not in report.counts(), str(report)
        with torch.no_grad(), vitfast.use_backend("torch"):
            torch.testing.assert_close(call(module), expected, msg=name)
