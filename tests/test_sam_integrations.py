"""vitfast.patch_model on the image encoders with decomposed relative positions (SAM, SAM-HQ, ViTDet): transformers'
SamVisionModel / SamModel (SamVisionAttention and SamVisionSdpaAttention) and VitDetModel, timm's samvit and
segment_anything's ImageEncoderViT, each equal to the unpatched model (outputs and every parameter gradient, the
rel-pos tables included) on every backend of vitfast.rel_pos_attention, in float32 and (cpp, torch) float64.

Every model is tiny: 32 x 32 px in patches of 8 (a 4 x 4 grid), one windowed block (windows of 3: the grid padded
to 6 x 6, SAM's padding) and one global block. SAM initialises its rel-pos tables to zero, which would hide a wrong
bias: they are drawn at random here. A spy on the fused op checks that both blocks take it.
"""
import copy
import importlib

import pytest
import torch
from torch import nn

import vitfast
from vitfast.backend import _unavailable
from vitfast.integrations import segment_anything as vsa

from _optional_libs import import_or_skip
from conftest import DEVICE, backend_cases
from test_patch_model import _patched_equal

CASES = [pytest.param(*c.values, torch.float32, id=f"{c.id}-fp32") for c in backend_cases("rel_pos_attention")]
CASES += [pytest.param(*c.values, torch.float64, id=f"{c.id}-fp64") for c in backend_cases("rel_pos_attention")
          if c.values[0] != "triton"]
TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
# (B, windows of 3 on the padded 6 x 6 grid, window tokens) and (B, global tokens) of the two blocks
WINDOW_Q, GLOBAL_Q = (8, 9), (2, 16)


def _randomize_rel_pos(model: nn.Module) -> None:
    """Non-zero rel-pos tables (every SAM implementation starts them at zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0.0, 0.5)


@pytest.fixture
def fused_calls(monkeypatch):
    """The (batch, query tokens) of every vitfast.rel_pos_attention call the adapters make."""
    calls = []

    def spy(q, *args, **kwargs):
        calls.append((q.shape[0], q.shape[2]))
        return vitfast.rel_pos_attention(q, *args, **kwargs)

    monkeypatch.setattr(vsa, "rel_pos_attention", spy)
    return calls


def _check(model, inputs, backend, device, dtype, pick, fused_calls, tol=None):
    """_patched_equal in `dtype` with random rel-pos tables (tolerances `tol` or TOL[dtype]); both blocks fused."""
    model = model.to(dtype)
    _randomize_rel_pos(model)
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    report = _patched_equal(model, inputs, backend, pick, device=device, **(tol or TOL[dtype]))
    assert fused_calls == [WINDOW_Q, GLOBAL_Q]  # the windowed block, then the global one
    return report


def _patched(report, kind="rel_pos_attention"):
    return [p.name for p in report.patched if p.kind == kind]


# ----------------------------------------------------------------------------------------------- transformers

_SAM = {"sam": ("SamVisionConfig", "SamVisionModel", "SamVision"),
        "sam_hq": ("SamHQVisionConfig", "SamHQVisionModel", "SamHQVision")}


def _sam_vision(family: str, attn: str):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = (getattr(transformers, n, None) for n in _SAM[family][:2])
    if model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {_SAM[family][1]}")
    config = config_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=48, image_size=32,
                        patch_size=8, window_size=3, global_attn_indexes=[1], output_channels=16,
                        initializer_range=0.1)  # SAM's default (1e-10) leaves nothing to compare
    return model_cls._from_config(config, attn_implementation=attn)


# SAM on every case; SAM-HQ (the same attention code under other class names) on the automatic choice
SAM_VISION_CASES = [pytest.param("sam", attn, *c.values, id=f"sam-{attn}-{c.id}") for attn in ("eager", "sdpa")
                    for c in CASES]
SAM_VISION_CASES += [pytest.param("sam_hq", attn, "auto", DEVICE, torch.float32, id=f"sam_hq-{attn}-auto")
                     for attn in ("eager", "sdpa")]


@pytest.mark.parametrize("family,attn,backend,device,dtype", SAM_VISION_CASES)
def test_transformers_sam_vision(family, attn, backend, device, dtype, fused_calls):
    model = _sam_vision(family, attn)
    # the eager attention takes its softmax in float32 whatever the dtype: no float64 reference
    tol = TOL[torch.float32] if attn == "eager" else None
    report = _check(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, backend, device, dtype,
                    lambda o: o.last_hidden_state, fused_calls, tol)
    cls = {"eager": f"{_SAM[family][2]}Attention", "sdpa": f"{_SAM[family][2]}SdpaAttention"}[attn]
    attn_layers = [p for p in report.patched if p.cls.endswith("." + cls)]
    assert [p.name for p in attn_layers] == ["vision_encoder.layers.0.attn", "vision_encoder.layers.1.attn"]
    assert "vitfast.rel_pos_attention" in attn_layers[0].what
    assert _patched(report, "linear_gelu") == ["vision_encoder.layers.0.mlp", "vision_encoder.layers.1.mlp"]


# SAM's image encoder copied into other transformers models under their own class names: module -> (config, model,
# the attention implementations the model takes)
_SAM_COPIES = {
    "deepseek_ocr2": ("DeepseekOcr2SamVisionConfig", "DeepseekOcr2SamVisionEncoder", ("eager", "sdpa")),
    "unlimited_ocr": ("UnlimitedOcrSamVisionConfig", "UnlimitedOcrSamVisionEncoder", ("eager", "sdpa")),
    "got_ocr2": ("GotOcr2VisionConfig", "GotOcr2VisionEncoder", ("eager",)),
    "pp_formulanet": ("PPFormulaNetVisionConfig", "PPFormulaNetVisionModel", ("eager",)),
    "slanext": ("SLANeXtVisionConfig", "SLANeXtVisionEncoder", ("eager",)),
}


@pytest.mark.parametrize("module,attn", [(m, a) for m, (*_, attns) in _SAM_COPIES.items() for a in attns])
def test_transformers_copies_of_sam_vision(module, attn, fused_calls):
    transformers = pytest.importorskip("transformers")
    try:
        modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no {module}")
    config_name, model_name, _ = _SAM_COPIES[module]
    # (PPFormulaNet's encoder ends in convolutions from 256 channels)
    config = getattr(modeling, config_name)(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=48, image_size=32, patch_size=8,
        window_size=3, global_attn_indexes=[1], output_channels=256 if module == "pp_formulanet" else 16,
        initializer_range=0.1)
    model = getattr(modeling, model_name)._from_config(config, attn_implementation=attn)
    pick = lambda o: o[0] if isinstance(o, tuple) else o.last_hidden_state  # noqa: E731
    report = _check(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, "auto", DEVICE, torch.float32, pick,
                    fused_calls)
    assert _patched(report) == ["layers.0.attn", "layers.1.attn"]
    assert _patched(report, "linear_gelu") == ["layers.0.mlp", "layers.1.mlp"]


def _vitdet():
    transformers = pytest.importorskip("transformers")
    config = transformers.VitDetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                       image_size=32, pretrain_image_size=32, patch_size=8, window_size=3,
                                       window_block_indices=[0], use_relative_position_embeddings=True)
    return transformers.VitDetModel(config)


@pytest.mark.parametrize("make", [lambda: _sam_vision("sam", "eager"), _vitdet], ids=["sam", "vitdet"])
def test_transformers_attention_weights_take_the_original_path(make, fused_calls):
    """output_attentions=True: the eager attention's weights, as unpatched (transformers 5 records SAM's with hooks,
    ViTDet passes the flag down); without it, the fused op."""
    model = make().eval()
    _randomize_rel_pos(model)
    x = torch.randn(1, 3, 32, 32)
    expected = model(pixel_values=x, output_attentions=True).attentions
    report = vitfast.patch_model(model, layer_norm=False)  # nothing else patched: the same weights, bit for bit
    fused = [p for p in report.patched if "rel_pos_attention" in p.what]
    assert len(fused) == 2 and all("keep the original path" in p.what for p in fused), str(report)
    out = model(pixel_values=x, output_attentions=True)
    assert len(out.attentions) == 2 and not fused_calls
    for got, want in zip(out.attentions, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    model(pixel_values=x)
    assert fused_calls == [(4, 9), (1, 16)]


def test_transformers_sam_vision_compiles_fullgraph():
    """The patched attention (its check for transformers' attention recorder included) compiles without a break."""
    model = _sam_vision("sam", "sdpa").eval()
    _randomize_rel_pos(model)
    vitfast.patch_model(model)
    x = torch.randn(2, 3, 32, 32)
    eager = model(x).last_hidden_state
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x).last_hidden_state
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=2e-5)


def test_transformers_sam_model(fused_calls):
    """The whole SamModel: the image encoder on the fused op, the mask decoder on the attention interface."""
    transformers = pytest.importorskip("transformers")
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=48, image_size=32, patch_size=8,
                  window_size=3, global_attn_indexes=[1], output_channels=16, num_pos_feats=8, initializer_range=0.1)
    config = transformers.SamConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=16, image_size=32, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16),
        initializer_range=0.1)
    model = transformers.SamModel(config)
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "input_points": torch.rand(2, 1, 2, 2) * 32}

    def pick(out):
        return torch.cat([out.pred_masks.flatten(1), out.iou_scores.flatten(1)], 1)

    report = _check(model, inputs, "auto", DEVICE, torch.float32, pick, fused_calls)
    assert report.patched[0].name == "" and "'vitfast'" in report.patched[0].what  # the mask decoder's interface
    assert _patched(report) == ["vision_encoder.layers.0.attn", "vision_encoder.layers.1.attn"]


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_transformers_vitdet(backend, device, dtype, fused_calls):
    report = _check(_vitdet(), {"pixel_values": torch.randn(2, 3, 32, 32)}, backend, device, dtype,
                    lambda o: o.last_hidden_state, fused_calls)
    assert _patched(report) == ["encoder.layer.0.attention", "encoder.layer.1.attention"]


# ----------------------------------------------------------------------------------------------- timm

def _samvit(**kw):
    timm = import_or_skip("timm")
    return timm.create_model("samvit_base_patch16", pretrained=False, **{
        **dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=1.5, window_size=3,
               global_attn_indexes=(1,), neck_chans=16, num_classes=0), **kw})


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_timm_samvit(backend, device, dtype, fused_calls):
    model = _samvit(qk_norm=True)  # q/k norms apply before the rel-pos terms are taken from q
    report = _check(model, {"x": torch.randn(2, 3, 32, 32)}, backend, device, dtype, lambda o: o, fused_calls)
    assert _patched(report) == ["blocks.0.attn", "blocks.1.attn"]
    assert report.counts() == {"rel_pos_attention": 2, "layer_norm": 8, "patch_embed": 1, "linear_gelu": 2,
                               "linear": 8}, str(report)
    # (layer_norm: with q_norm, k_norm)


def test_timm_samvit_rope_keeps_its_path():
    model = _samvit(use_rel_pos=False, use_rope=True)
    report = vitfast.patch_model(model)
    left = {l.name: l.reason for l in report.left}
    assert "rotary" in left["blocks.0.attn"] and "rotary" in left["blocks.1.attn"], str(report)


def test_timm_mvitv2_pooling_attention_is_left_with_why():
    import_or_skip("timm")
    from timm.models.mvitv2 import MultiScaleAttention

    model = nn.Sequential(MultiScaleAttention(32, 32, (4, 4), num_heads=2, kernel_kv=(3, 3), stride_kv=(2, 2)))
    report = vitfast.patch_model(model)
    assert "MViTv2 pooling attention" in {l.name: l.reason for l in report.left}["0"], str(report)


# ----------------------------------------------------------------------------------------------- segment_anything

def _image_encoder(use_rel_pos=True):
    import_or_skip("segment_anything")
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=1.5, out_chans=16,
                           use_rel_pos=use_rel_pos, window_size=3, global_attn_indexes=(1,))


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_segment_anything(backend, device, dtype, fused_calls):
    report = _check(_image_encoder(), {"x": torch.randn(2, 3, 32, 32)}, backend, device, dtype, lambda o: o,
                    fused_calls)
    assert _patched(report) == ["blocks.0.attn", "blocks.1.attn"]
    assert report.counts() == {"rel_pos_attention": 2, "layer_norm": 4, "linear_gelu": 2, "linear": 8}, str(report)


def test_report_names_the_flags_that_left_modules():
    report = vitfast.patch_model(_image_encoder(), attention=False, mlp=False)
    reasons = {l.name: l.reason for l in report.left if l.name.startswith("blocks.0.")}
    assert reasons == {"blocks.0.attn": "attention=False", "blocks.0.mlp": "mlp=False"}, str(report)


def _wide(family: str, rel_pos: bool = True):
    """A one-block model of head dim 300 (width 600, 2 heads) with rel-pos tables (or without), and its call."""
    if family == "segment_anything":
        import_or_skip("segment_anything")
        from segment_anything.modeling import ImageEncoderViT

        return ImageEncoderViT(img_size=32, patch_size=8, embed_dim=600, depth=1, num_heads=2, mlp_ratio=0.1,
                               out_chans=16, use_rel_pos=rel_pos, window_size=0), lambda m, x: m(x)
    if family == "timm":
        return _samvit(embed_dim=600, depth=1, window_size=0, global_attn_indexes=(), use_rel_pos=rel_pos), \
            lambda m, x: m(x)
    transformers = pytest.importorskip("transformers")
    if family == "sam":
        config = transformers.SamVisionConfig(hidden_size=600, output_channels=16, num_hidden_layers=1, mlp_dim=64,
                                              num_attention_heads=2, image_size=32, patch_size=8, window_size=0,
                                              global_attn_indexes=[0])
        return transformers.SamVisionModel(config), lambda m, x: m(pixel_values=x).last_hidden_state
    config = transformers.VitDetConfig(hidden_size=600, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=1,
                                       image_size=32, pretrain_image_size=32, patch_size=8,
                                       use_relative_position_embeddings=True)
    return transformers.VitDetModel(config), lambda m, x: m(x).last_hidden_state


@pytest.mark.parametrize("family", ["segment_anything", "timm", "sam", "vitdet"])
def test_head_dims_beyond_the_op_are_left_with_why(family):
    """vitfast.rel_pos_attention takes head dims up to 256 on every backend: an attention with rel-pos tables of a
    wider head is left, with the reason, and runs its own code (it was reported patched, and every call raised)."""
    model, call = _wide(family)
    model.eval()
    expected_model = copy.deepcopy(model)
    report = vitfast.patch_model(model)
    left = {l.name: l.reason for l in report.left}
    attn = next(name for name in left if name.endswith("attn") or name.endswith("attention"))
    assert left[attn] == "head dim 300 > 256 (vitfast.rel_pos_attention takes 1..256)", str(report)
    assert "rel_pos_attention" not in report.counts(), str(report)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(call(model, x), call(expected_model, x))


@pytest.mark.parametrize("family", ["segment_anything", "timm"])
def test_wide_heads_without_rel_pos_are_left_with_why(family):
    """Without tables the attention runs vitfast.attention, which takes head dims up to 256 too: a wider head was
    reported patched, and every call raised under a forced backend. It is left, with the reason."""
    model, call = _wide(family, rel_pos=False)
    model.eval()
    expected_model = copy.deepcopy(model)
    report = vitfast.patch_model(model)
    left = {l.name: l.reason for l in report.left}
    assert left["blocks.0.attn"] == "head dim 300 > 256 (vitfast.attention takes 1..256)", str(report)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), vitfast.use_backend("torch"):  # (the other kinds run vitfast's torch backend: not bitwise)
        torch.testing.assert_close(call(model, x), call(expected_model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_segment_anything_without_rel_pos_is_plain_attention(fused_calls, monkeypatch, backend):
    """Plain attention follows the attention row of integrations/choice.py: ATen's SDPA on CPU and CUDA (as the
    other patched attention modules), vitfast.attention where a backend is forced."""
    if backend == "cpp" and (DEVICE != "cpu" or _unavailable("attention", "cpp", torch.device("cpu")) is not None):
        pytest.skip("the cpp backend runs CPU tensors only, and only where it is built")
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return vitfast.attention(*args, **kwargs)
    monkeypatch.setattr(vsa, "attention", spy)
    report = _patched_equal(_image_encoder(use_rel_pos=False), torch.randn(2, 3, 32, 32, device=DEVICE), backend)
    assert _patched(report) == ["blocks.0.attn", "blocks.1.attn"] and not fused_calls
    # _patched_equal runs the patched model once, with grad
    # (auto: ATen's SDPA on CPU and CUDA alike, by the attention row)
    assert len(calls) == (0 if backend == "auto" else 2), calls


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_transformers_sam_config_builds_after_patching(attn):
    """patch_model names vitfast's attention in the config; SAM picks its vision attention class by that name when
    built, so a model built from the patched model's config raised KeyError: 'vitfast'. It builds the class the name
    stands for (SDPA's masks: the sdpa class; eager's: the eager one)."""
    model = _sam_vision("sam", attn)
    vitfast.patch_model(model)
    rebuilt = type(model)(model.config)
    want = {"eager": "SamVisionAttention", "sdpa": "SamVisionSdpaAttention"}[attn]
    assert type(rebuilt.vision_encoder.layers[0].attn).__name__ == want
