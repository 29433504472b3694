"""transformers models with attn_implementation="vitfast" against the same weights run eagerly."""
import copy
import importlib
import re

import pytest
import torch

import vitfast

from conftest import backend_cases
from test_patch_model import _patched_equal

transformers = pytest.importorskip("transformers")
from vitfast.integrations import transformers as vt  # noqa: E402

vt.register()
CASES = backend_cases("attention")


def _pair(model, device="cpu"):
    """The model in eager attention, and a copy with the same weights in vitfast attention, both on `device`."""
    model.set_attn_implementation("eager")
    mine = copy.deepcopy(model)
    mine.set_attn_implementation("vitfast")
    return model.to(device).eval(), mine.to(device).eval()


def _compare(eager, mine, backend, inputs, pick, atol=2e-5):
    """Outputs and every parameter gradient of `pick(model(**inputs))` agree between the two models (the inputs are
    moved to the models' device).

    The loss weights the outputs randomly: a plain sum of squares of LayerNorm outputs is nearly constant,
    which leaves only rounding noise in the gradients.
    """
    device = next(eager.parameters()).device
    inputs = {name: t.to(device) for name, t in inputs.items()}
    out_e = pick(eager(**inputs))
    weights = torch.randn_like(out_e)
    (out_e * weights).sum().backward()
    with vitfast.use_backend(backend):
        out_m = pick(mine(**inputs))
        (out_m * weights).sum().backward()
    torch.testing.assert_close(out_m, out_e, rtol=1e-4, atol=atol)
    for (name, p_e), (_, p_m) in zip(eager.named_parameters(), mine.named_parameters()):
        if p_e.grad is not None:
            scale = p_e.grad.abs().max().item()
            torch.testing.assert_close(p_m.grad, p_e.grad, rtol=1e-3, atol=5 * atol * max(1.0, scale),
                                       msg=lambda m: f"{name}: {m}")


def _vision_config(cls, **kw):
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=32,
               patch_size=8, **kw)


@pytest.mark.parametrize("backend,device", CASES)
def test_vit(backend, device):
    model = transformers.ViTModel(_vision_config(transformers.ViTConfig), add_pooling_layer=False)
    _compare(*_pair(model, device), backend, {"pixel_values": torch.randn(2, 3, 32, 32)},
             lambda o: o.last_hidden_state)


@pytest.mark.parametrize("backend,device", CASES)
def test_deit(backend, device):
    model = transformers.DeiTModel(_vision_config(transformers.DeiTConfig), add_pooling_layer=False)
    _compare(*_pair(model, device), backend, {"pixel_values": torch.randn(2, 3, 32, 32)},
             lambda o: o.last_hidden_state)


@pytest.mark.parametrize("backend,device", CASES)
def test_clip_text_padding_and_causal_mask(backend, device):
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    ids = torch.randint(1, 98, (2, 9), device=device)
    mask = torch.ones(2, 9, dtype=torch.long, device=device)
    mask[1, 5:] = 0  # padding: without the mask interface these positions would be attended to
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32, device=device)}
    eager, mine = _pair(model, device)
    pick = lambda o: torch.cat([o.text_model_output.last_hidden_state.flatten(1), o.image_embeds], -1)  # noqa: E731
    _compare(eager, mine, backend, inputs, pick)
    # the padding mask reaches the kernel: without it the padded positions attend to each other
    with torch.no_grad(), vitfast.use_backend(backend):
        unmasked = mine(input_ids=ids, pixel_values=inputs["pixel_values"]).text_model_output.last_hidden_state
        masked = mine(**inputs).text_model_output.last_hidden_state
    assert torch.allclose(unmasked[1, :5], masked[1, :5], atol=1e-5)
    assert not torch.allclose(unmasked[1, 6:], masked[1, 6:], atol=1e-4)


def test_output_attentions_runs_the_eager_attention():
    """output_attentions=True on the vitfast implementation runs the model's own eager attention: CLIP's text
    weights with its causal and padding masks (the causal one left to is_causal by the SDPA mask function), its
    vision weights, and a patched Swin's (its fused layer's fallback); it raised before."""
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    eager, mine = _pair(transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                                       projection_dim=16)))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {"input_ids": torch.randint(1, 98, (2, 9)), "attention_mask": mask,
              "pixel_values": torch.randn(2, 3, 32, 32), "output_attentions": True}
    want, got = eager(**inputs), mine(**inputs)
    for part in ("text_model_output", "vision_model_output"):
        for a, b in zip(getattr(got, part).attentions, getattr(want, part).attentions, strict=True):
            torch.testing.assert_close(a, b)
    del inputs["attention_mask"]  # the causal mask alone, left to is_causal (a 2-D mask then: IndexError)
    want, got = eager(**inputs), mine(**inputs)
    for a, b in zip(got.text_model_output.attentions, want.text_model_output.attentions, strict=True):
        torch.testing.assert_close(a, b)
    swin = transformers.SwinModel(transformers.SwinConfig(image_size=36, patch_size=2, embed_dim=16, depths=[2, 2],
                                                          num_heads=[2, 2], window_size=4)).eval()
    swin.set_attn_implementation("eager")
    patched = copy.deepcopy(swin)
    vitfast.patch_model(patched)
    x = torch.randn(1, 3, 36, 36)
    want, got = swin(pixel_values=x, output_attentions=True), patched(pixel_values=x, output_attentions=True)
    assert want.attentions
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)


def test_attention_weights_recorded_with_hooks_are_returned():
    """transformers 5 records some models' attention weights with hooks and passes output_attentions no further
    (SigLIP, GPT2, ...): with a vitfast backend forced they came back empty, where the original returns eager's."""
    config = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, image_size=32, patch_size=8)
    model = transformers.SiglipVisionModel._from_config(config, attn_implementation="eager").eval()
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(pixel_values=x, output_attentions=True).attentions
        assert len(want) == 2
        for backend in ("auto", "torch"):
            with vitfast.use_backend(backend):
                got = patched(pixel_values=x, output_attentions=True).attentions
            assert len(got) == len(want), backend
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)


def test_models_whose_code_tests_the_implementation_name_are_left():
    """Modeling code that tests `config._attn_implementation == "sdpa"` (or `in ("eager", "sdpa")`) takes another
    branch under vitfast's name: DeepSeek-V3.2's sparse attention builds its top-k mask only under "eager" or
    "sdpa" (patched, every query saw every key: logits 28% off; Gemma 4 sliced its KV-shared layers' queries). Such
    a model keeps its implementation, reported left with the reason; its sub-models that do not test it (a vision
    encoder beside a GPT-2 decoder) are switched."""
    config = transformers.DeepseekV32Config(
        vocab_size=100, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        head_dim=8, index_topk=4, index_head_dim=8, index_n_heads=2, first_k_dense_replace=2,
        attn_implementation="sdpa")
    model = transformers.DeepseekV32ForCausalLM(config).eval()
    patched = copy.deepcopy(model)
    report = vitfast.patch_model(patched)
    assert [l.reason for l in report.left if l.name == ""] == [
        "DeepseekV32Attention (transformers.models.deepseek_v32.modeling_deepseek_v32) tests the attention "
        "implementation's name against 'sdpa' or 'eager' and would take another branch under vitfast's: left on "
        "'sdpa'"], str(report)
    assert patched.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        for backend in ("auto", "cpp"):
            with vitfast.use_backend(backend):
                torch.testing.assert_close(patched(ids, use_cache=False).logits, expected, msg=backend)
    # a ViT encoder beside a GPT-2 decoder (whose code tests the name): the encoder is switched on its own
    encoder = _vision_config(transformers.ViTConfig)
    decoder = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, add_cross_attention=True,
                                      is_decoder=True)
    model = transformers.VisionEncoderDecoderModel(
        transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)).eval()
    patched = copy.deepcopy(model)
    report = vitfast.patch_model(patched)
    assert "GPT2Attention" in {l.name: l.reason for l in report.left}["decoder"], str(report)
    assert (patched.encoder.config._attn_implementation, patched.decoder.config._attn_implementation) == (
        vt.NAME, "sdpa")
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 50, (2, 5))
    with torch.no_grad(), vitfast.use_backend("cpp"):
        torch.testing.assert_close(patched(pixel_values=pixels, decoder_input_ids=ids).logits,
                                   model(pixel_values=pixels, decoder_input_ids=ids).logits)
    vitfast.unpatch_model(patched)
    assert patched.encoder.config._attn_implementation == "sdpa"


def test_a_bool_mask_given_to_a_model_that_ran_eager_is_added_as_eager_adds_it():
    """transformers 5's eager attention adds a 4-D mask it is given to the scores; a bool one (GroundingDINO's
    phrase mask for its BERT text backbone) adds 1 where True and masks nothing. Patched from "eager", the model read
    it as a hard mask (text features 7.7e-3 off); it runs its eager attention with the mask as given, as before."""
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, attn_implementation="eager")
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)
    assert patched.config._attn_implementation == vt.NAME_EAGER
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[:, :, :3, 3:] = mask[:, :, 3:, :3] = False  # two phrases
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
        for backend in ("auto", "cpp"):
            with vitfast.use_backend(backend):
                torch.testing.assert_close(patched(ids, attention_mask=mask).last_hidden_state, expected,
                                           msg=backend)


def test_one_layer_of_a_patched_model_compiles_fullgraph():
    """Compiling one layer (per-layer compilation, as accelerate's compile_regions): the check for attention
    weights recorded with hooks read transformers' ContextVar, which dynamo cannot trace."""
    model = transformers.ViTModel(_vision_config(transformers.ViTConfig)).eval()
    vitfast.patch_model(model)
    layer = model.encoder.layer[0] if hasattr(model, "encoder") else model.layers[0]
    x = torch.randn(1, 17, 32)
    with torch.no_grad(), vitfast.use_backend("cpp"):
        want = layer(x)
        got = torch.compile(layer, fullgraph=True, backend="eager")(x)
    pick = (lambda o: o[0] if isinstance(o, tuple) else o)  # noqa: E731
    torch.testing.assert_close(pick(got), pick(want))


@pytest.mark.parametrize("backend,device", CASES)
def test_value_head_dim_unlike_the_query_takes_the_original_path(backend, device):
    """ConditionalDETR's decoder cross-attention gives v half q's head dim, which SDPA takes and vitfast.attention
    does not: a forced backend raised "q, k and v must have one head dim"."""
    config = transformers.ConditionalDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=dict(model_type="resnet", depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8,
                             out_features=["stage2"]),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5)
    model = transformers.ConditionalDetrModel(config).eval()
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), vitfast.use_backend(backend):
        torch.testing.assert_close(patched.to(device)(pixel_values=x.to(device)).last_hidden_state.cpu(),
                                   model(pixel_values=x).last_hidden_state, atol=2e-5, rtol=1e-4)


def test_patch_embeddings_refuse_what_the_original_refuses_with_its_error():
    """An image smaller than one patch: the original's RuntimeError (conv2d's), not a ValueError of vitfast's."""
    model = transformers.ViTModel(_vision_config(transformers.ViTConfig)).eval()
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(RuntimeError) as want:
        model.embeddings.patch_embeddings(x)
    for backend in ("auto", "cpp", "torch"):
        with vitfast.use_backend(backend), pytest.raises(RuntimeError) as got:
            patched.embeddings.patch_embeddings(x)
        assert str(got.value) == str(want.value), backend


def _detr():
    """A tiny DetrModel with a transformers ResNet backbone (whose own attention implementation is eager)."""
    config = transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=dict(model_type="resnet", depths=[1] * 4, hidden_sizes=[16] * 4, embedding_size=16,
                             out_features=["stage4"]),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=48, decoder_ffn_dim=48, num_queries=5, dropout=0.0, attention_dropout=0.0)
    return transformers.DetrModel(config)


def test_output_attentions_keeps_sdpa_zeros_for_a_fully_padded_image():
    """A patched DETR that ran SDPA, called with output_attentions=True, runs eager attention; eager's finfo.min
    mask made a query that sees no key (an all-zero pixel_mask) average over all keys (logits 0.1 apart): such
    queries give zeros, as SDPA and vitfast.attention do."""
    model = _detr().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "backbone" not in name:
                p.normal_(std=0.3)
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)
    x, mask = torch.randn(2, 3, 64, 64), torch.ones(2, 64, 64, dtype=torch.long)
    mask[1] = 0
    with torch.no_grad():
        want = model(pixel_values=x, pixel_mask=mask).last_hidden_state
        got = patched(pixel_values=x, pixel_mask=mask, output_attentions=True)
    torch.testing.assert_close(got.last_hidden_state, want)
    assert got.cross_attentions[0][1].abs().max() == 0  # the padded image's queries see no key


def test_unpatch_restores_each_sub_config():
    """unpatch_model gives each sub-model its own previous implementation back: DETR's ResNet backbone was eager,
    and restoring the top model's sdpa on it raised, leaving the model half restored."""
    model = _detr()

    def implementations():
        return {n: m.config._attn_implementation for n, m in model.named_modules()
                if isinstance(m, transformers.PreTrainedModel)}
    before = implementations()
    assert set(before.values()) == {"sdpa", "eager"}, before
    vitfast.patch_model(model)
    assert implementations() == {n: vt.NAME_EAGER if impl == "eager" else vt.NAME for n, impl in before.items()}
    vitfast.unpatch_model(model)
    assert implementations() == before
    assert not any(hasattr(m, "_vitfast_patch") for m in model.modules())


def test_patched_model_saved_whole_runs_in_a_fresh_process(tmp_path):
    """torch.save of a whole patched model, torch.load in another process: its config names vitfast's attention,
    which unpickling registers (the forward raised KeyError: not a registered attention implementation); unpatch
    there restores the original's. So does a part of it saved on its own."""
    import subprocess
    import sys

    model = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=48, image_size=16, patch_size=8)).eval()
    vitfast.patch_model(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state
    torch.save({"model": model, "x": x, "want": want}, tmp_path / "patched.pt")
    code = (f"import torch, vitfast\nd = torch.load({str(tmp_path / 'patched.pt')!r}, weights_only=False)\n"
            "with torch.no_grad():\n    got = d['model'](pixel_values=d['x']).last_hidden_state\n"
            "torch.testing.assert_close(got, d['want'])\nvitfast.unpatch_model(d['model'])\n"
            "print(d['model'].config._attn_implementation)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "sdpa"
    # a part saved on its own (a layer: its attention reads the shared config's name) registers the names too
    layer, hidden = model.layers[0], torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.save({"layer": layer, "h": hidden, "want": layer(hidden)}, tmp_path / "layer.pt")
    code = (f"import torch\nd = torch.load({str(tmp_path / 'layer.pt')!r}, weights_only=False)\n"
            "with torch.no_grad():\n    torch.testing.assert_close(d['layer'](d['h']), d['want'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_an_implementation_set_since_patching_is_kept():
    """A user who sets another implementation on a patched model (set_attn_implementation("eager")): a second
    patch_model reported it "already patched" while it ran plain eager, and unpatch_model set it back to "sdpa"."""
    model = transformers.ViTModel(_vision_config(transformers.ViTConfig))
    vitfast.patch_model(model)
    model.set_attn_implementation("eager")
    vitfast.unpatch_model(model)
    assert model.config._attn_implementation == "eager"
    vitfast.patch_model(model)
    model.set_attn_implementation("eager")
    report = vitfast.patch_model(model)
    assert [r.kind for r in report.patched if r.name == ""] == ["attention"], str(report)
    assert model.config._attn_implementation == vt.NAME_EAGER
    vitfast.unpatch_model(model)
    assert model.config._attn_implementation == "eager"


def test_a_sub_config_set_since_patching_is_kept():
    """The same for one sub-config (set_attn_implementation({"vision_config": "eager"}) on a patched CLIPModel): a
    second patch_model reported the model "already patched" while its vision tower ran plain eager, and
    unpatch_model set the tower back to "sdpa"."""
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=_vision_config(dict),
                                                           projection_dim=16))
    vitfast.patch_model(model)
    model.set_attn_implementation({"vision_config": "eager"})
    vitfast.unpatch_model(model)
    assert vt._implementations(model.config) == {"": "sdpa", "vision_config": {"": "eager"},
                                                 "text_config": {"": "sdpa"}}
    vitfast.patch_model(model)
    model.set_attn_implementation({"text_config": "sdpa"})
    report = vitfast.patch_model(model)
    assert [r.what for r in report.patched if r.name == ""] == [
        "attn_implementation set since patching (text_config 'sdpa') -> vitfast's"], str(report)
    assert vt._implementations(model.config) == {"": vt.NAME, "vision_config": {"": vt.NAME_EAGER},
                                                 "text_config": {"": vt.NAME}}
    vitfast.unpatch_model(model)
    assert vt._implementations(model.config) == {"": "sdpa", "vision_config": {"": "eager"},
                                                 "text_config": {"": "sdpa"}}
    # patch_model(attention=False) leaves such a set; so does patch_model on a model built on vitfast's names
    vitfast.patch_model(model)
    model.set_attn_implementation({"vision_config": "sdpa"})
    vitfast.patch_model(model, attention=False)
    assert vt._implementations(model.config)["vision_config"] == {"": "sdpa"}
    vitfast.unpatch_model(model)
    model.set_attn_implementation({"": vt.NAME, "text_config": vt.NAME, "vision_config": "eager"})
    assert not [r for r in vitfast.patch_model(model).patched if r.kind == "attention"]
    assert vt._implementations(model.config)["vision_config"] == {"": "eager"}


def test_a_sub_model_set_since_patching_is_kept_in_any_order():
    """A sub-model patched on its own as well as in its model: the user's set of it since is kept by the unpatch of
    either, whichever was patched again (a sub-model's older record, or the model's, set it back to "sdpa")."""
    def model():
        encoder = _vision_config(transformers.ViTConfig)
        decoder = transformers.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=2, is_decoder=True, add_cross_attention=True)
        return transformers.VisionEncoderDecoderModel(
            transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))

    for again, undo in (("model", "encoder"), ("encoder", "model")):
        m = model()
        vitfast.patch_model(m.encoder)
        vitfast.patch_model(m)
        m.encoder.set_attn_implementation("eager")
        vitfast.patch_model(m if again == "model" else m.encoder)
        assert m.config.encoder._attn_implementation == vt.NAME_EAGER
        vitfast.unpatch_model(m if undo == "model" else m.encoder)
        assert m.config.encoder._attn_implementation == "eager", (again, undo)


def test_patched_eager_models_keep_eager_masks():
    """A model built with eager attention keeps eager's masks when patch_model switches it to vitfast's attention
    (NAME_EAGER): a query that sees no key (every pixel of a DETR image padded, left-padded CLIP text tokens) averages
    over all the keys as before, where SDPA's masks changed those outputs (by 0.3 in DETR's logits)."""
    detr = transformers.DetrForObjectDetection(_detr().config)
    detr.set_attn_implementation("eager")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    text.set_attn_implementation("eager")
    pixel_mask = torch.ones(2, 64, 64, dtype=torch.long)
    pixel_mask[1] = 0
    ids = torch.randint(3, 100, (2, 8))
    ids[:, -1] = 2
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :3] = 0
    cases = [(detr, {"pixel_values": torch.randn(2, 3, 64, 64), "pixel_mask": pixel_mask},
              lambda o: torch.cat([o.logits.flatten(1), o.pred_boxes.flatten(1)], 1)),
             (text, {"input_ids": ids, "attention_mask": attention_mask}, lambda o: o.last_hidden_state)]
    for model, inputs, pick in cases:
        model.eval()
        patched = copy.deepcopy(model)
        report = vitfast.patch_model(patched)
        with torch.no_grad():
            torch.testing.assert_close(pick(patched(**inputs)), pick(model(**inputs)), atol=2e-5, rtol=1e-4)
        assert f"'eager' -> '{vt.NAME_EAGER}'" in str(report)


def test_patched_eager_model_gradients_where_a_query_sees_no_key():
    """Where the original is faster (CPU), a patched model that ran eager runs its own eager attention: transformers'
    SDPA path, which it ran before, got the gradients of a query that sees no key (left padding under the causal
    mask) wrong by O(1) with eager's finfo.min masks, so a loss over every token's output trained differently."""
    config = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=16, bos_token_id=0,
                                         eos_token_id=2, pad_token_id=1)
    model = transformers.CLIPTextModel(config)
    model.set_attn_implementation("eager")
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)
    ids = torch.randint(3, 90, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0

    def grads(m):
        m.zero_grad()
        (m(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1) * torch.linspace(-1, 1, 32)).sum().backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    want, got = grads(model), grads(patched)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_patched_eager_models_run_their_own_eager_function():
    """The eager function a module falls back to is the one its forward names (Llama4's vision attention:
    vision_eager_attention_forward; Phi4's: simple_eager_attention_forward), not its modeling file's text one, which
    raised on these modules; and eager's masks carry causality (Phi4's vision attention sets is_causal but runs
    bidirectionally under eager: vitfast_eager had made it causal)."""
    phi4 = pytest.importorskip("transformers.models.phi4_multimodal.modeling_phi4_multimodal")
    if not hasattr(transformers, "Llama4VisionModel"):
        pytest.skip(f"transformers {transformers.__version__} has no Llama4VisionModel")
    llama4 = transformers.Llama4VisionModel(transformers.Llama4VisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8, vision_output_dim=128, projector_input_dim=128, projector_output_dim=128,
        pixel_shuffle_ratio=0.5))
    phi = phi4.Phi4MultimodalVisionModel(phi4.Phi4MultimodalVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
        patch_size=14))
    for model, size in ((llama4, 32), (phi, 28)):
        model.set_attn_implementation("eager")
        model.eval()
        patched = copy.deepcopy(model)
        vitfast.patch_model(patched)
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            want = model(pixel_values=x).last_hidden_state
            for backend in ("auto", "torch"):
                with vitfast.use_backend(backend):
                    got = patched(pixel_values=x).last_hidden_state
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"{type(model).__name__} {backend}")


def test_models_that_pick_attention_classes_by_name_build_from_a_patched_config():
    """GIT's attention classes by name ("eager" only): a patched eager GitModel's config named vitfast_eager, which
    its table lacked (KeyError when built from it)."""
    if not hasattr(transformers, "GitModel"):
        pytest.skip(f"transformers {transformers.__version__} has no GitModel")
    config = transformers.GitConfig(vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=48, image_size=16, patch_size=8),
                                    hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=48, vocab_size=50, max_position_embeddings=16)
    model = transformers.GitModel._from_config(config, attn_implementation="eager")
    vitfast.patch_model(model)
    assert model.config._attn_implementation == vt.NAME_EAGER
    transformers.GitModel(model.config)


def test_models_without_the_attention_interface_are_not_reported_as_switched():
    """A ResNet and a ConvNeXt can set an attention implementation that none of their modules reads: switching the
    name was reported as "patched: attention". GIT calls the interface without any _supports_* flag and is still
    switched, as is DETR's ResNet backbone with DETR."""
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    convnext = transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1],
                                                                      num_stages=2))
    for model in (resnet, convnext):
        before = model.config._attn_implementation
        report = vitfast.patch_model(model)
        assert [r.reason for r in report.left if r.name == ""] == [
            "no module of the model calls transformers' AttentionInterface"], (type(model).__name__, report)
        assert model.config._attn_implementation == before
    git = transformers.GitVisionModel(transformers.GitVisionConfig(hidden_size=32, num_hidden_layers=1,
                                                                   num_attention_heads=2, intermediate_size=48,
                                                                   image_size=16, patch_size=8))
    assert [r.kind for r in vitfast.patch_model(git).patched if r.name == ""] == ["attention"]
    detr = _detr()
    assert [r.kind for r in vitfast.patch_model(detr).patched if r.name == ""] == ["attention"]
    assert detr.backbone.model.config._attn_implementation == vt.NAME_EAGER


def test_swin_backbone_runs_the_fused_window_attention():
    """SwinBackbone (UperNet, MaskFormer) calls its layers with always_partition=True, which changes nothing where
    the map is larger than the window: the fused op runs there (it ran transformers' path on every call) and the
    layers on a map no larger than the window keep transformers' path (it partitions them unclamped)."""
    if not vitfast._ext.HAS_EXT:
        pytest.skip(vitfast._ext.EXT_ERROR)
    config = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                     window_size=4, out_features=["stage1", "stage2"])
    model = transformers.SwinBackbone(config).eval()
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name:
            torch.nn.init.normal_(p, std=0.5)
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)
    for size, fused in [(64, 4), (24, 2)]:  # maps 16 and 8 / 6 and 3: the last smaller than the window
        x = torch.randn(2, 3, size, size)
        with torch.no_grad(), vitfast.use_backend("cpp"), torch.profiler.profile() as prof:
            got = patched(x).feature_maps
        assert sum(e.name == "vitfast::window_attention" for e in prof.events()) == fused
        with torch.no_grad():
            want = model(x).feature_maps
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_swin_projections_swapped_after_patching_run_as_swapped():
    """HF Swin's fused layer reads q, k and v as one product: a projection swapped since patching without its bias
    dropped the others' biases (0.24 off) or failed on the missing one (TypeError), and one of another dtype raised
    vitfast.linear's ValueError where the original raises its own RuntimeError. Those run the original layer."""
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2],
                                     window_size=4)
    model = transformers.SwinModel(config, add_pooling_layer=False).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias") or "relative_position_bias_table" in name:
            torch.nn.init.normal_(p)  # (transformers starts them at zero)
    x = torch.randn(2, 3, 32, 32)
    for which in ("q_proj", "v_proj"):
        original = copy.deepcopy(model)
        patched = copy.deepcopy(model)
        vitfast.patch_model(patched)
        for m in (original, patched):
            for layer in m.encoder.layers[0].blocks:
                setattr(layer.attention, which, torch.nn.Linear(16, 16, bias=False))
        patched.load_state_dict(original.state_dict())
        with torch.no_grad(), vitfast.use_backend("cpp"):
            torch.testing.assert_close(patched(x).last_hidden_state, original(x).last_hidden_state, msg=which)
    for m in (original, patched):
        m.encoder.layers[0].blocks[0].attention.k_proj.double()
    with pytest.raises(RuntimeError) as theirs:
        original(x)
    with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
        patched(x)



def test_swin_layer_with_a_forward_set_on_the_instance_is_left_as_it_is():
    """A forward set on one Swin layer before patching (a user's checkpointing wrapper, accelerate's hooks) was
    overwritten by the fused layer and not restored by unpatch_model; it is left, with the reason, as in patch_model."""
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2],
                                     window_size=4)
    model = transformers.SwinModel(config, add_pooling_layer=False).eval()
    layer = model.encoder.layers[0].blocks[0]
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return type(layer).forward(layer, *args, **kwargs)
    layer.forward = wrapped
    report = vitfast.patch_model(model)
    swin = [(r.name, getattr(r, "reason", None)) for r in report.patched + report.left if r.cls.endswith(".SwinLayer")]
    assert sorted(swin) == [("encoder.layers.0.blocks.0", "forward set on the instance (a wrapper's or a hook "
                                                          "library's): left as it is"),
                            ("encoder.layers.0.blocks.1", None)], str(report)
    model(torch.randn(1, 3, 32, 32))
    vitfast.unpatch_model(model)
    model(torch.randn(1, 3, 32, 32))
    assert layer.forward is wrapped and calls == [1, 1]

def _old_swin_layer_models():
    """Donut's and MaskFormer's Swin backbones and CLAP's audio encoder (transformers' older Swin layer), each with
    maps that divide into windows, that need padding, and (MaskFormer: always partitioned) one no larger than the
    window; how many Swin layers each has, and how many of them run the fused op."""
    donut = transformers.DonutSwinModel(transformers.DonutSwinConfig(
        image_size=[36, 44], patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=3,
        drop_path_rate=0.0))
    maskformer = transformers.MaskFormerSwinBackbone(transformers.MaskFormerSwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=3,
        drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3"]))
    clap = transformers.ClapAudioModel(transformers.ClapAudioConfig(
        spec_size=64, window_size=4, num_mel_bins=16, hidden_size=64, patch_embeds_hidden_size=16, depths=[2, 2],
        num_attention_heads=[2, 4], drop_path_rate=0.0, hidden_dropout_prob=0.0, enable_fusion=False,
        patch_stride=(4, 4), patch_size=4))
    return [(donut, {"pixel_values": torch.randn(2, 3, 36, 44)}, lambda o: o.last_hidden_state, 4, 4),  # 9x11, 5x6
            (maskformer, {"pixel_values": torch.randn(2, 3, 32, 40)}, lambda o: o.feature_maps[-1], 6, 4),  # 2x3 last
            (clap, {"input_features": torch.randn(2, 1, 100, 16)}, lambda o: o.last_hidden_state, 4, 4)]


# (Triton through the one adapter in the MaskFormer case alone: the interpreter takes a minute a model)
@pytest.mark.parametrize("which,backend,device", [
    pytest.param(which, *case.values, id=f"{which}-{case.id}") for which in ("donut", "maskformer", "clap")
    for case in backend_cases("window_attention") if case.values[0] != "triton" or which == "maskformer"])
def test_older_swin_layers_run_the_fused_window_attention(which, backend, device):
    """transformers' older Swin layer (Donut's and MaskFormer's Swin backbones, CLAP's audio encoder: its own
    attention, not the interface's) is fused as SwinLayer is: outputs and every parameter gradient as before
    patching, the attention inside reported covered, not left; a map no larger than the window keeps
    transformers' path where the layer partitions it unclamped (MaskFormer)."""
    model, inputs, pick, layers, fused = _old_swin_layer_models()[["donut", "maskformer", "clap"].index(which)]
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name:
            torch.nn.init.normal_(p, std=0.5)  # (transformers starts them at zero, which would hide a wrong bias)
    patched = copy.deepcopy(model).to(device).train()
    report = vitfast.patch_model(patched)
    assert len([r for r in report.patched if r.kind == "window_attention"]) == layers, str(report)
    assert not [r for r in report.left if "Attention" in r.cls], str(report)
    if backend == "cpp":
        with torch.no_grad(), vitfast.use_backend("cpp"), torch.profiler.profile() as prof:
            patched(**inputs)
        assert sum(e.name == "vitfast::window_attention" for e in prof.events()) == fused
    _compare(model.to(device).train(), patched, backend, inputs, pick)


def test_older_swin_layer_with_an_attention_subclass_is_left():
    """The fused older Swin layer calls neither its attention nor the attention's output module: a layer whose
    attention (or output) is a subclass (one that records or changes its output) was fused, skipping it."""
    model = _old_swin_layer_models()[0][0]
    layer = model.encoder.layers[0].blocks[0]

    class Recording(type(layer.attention)):
        pass

    class Scaled(type(layer.attention.output)):
        pass

    layer.attention.__class__ = Recording
    model.encoder.layers[1].blocks[1].attention.output.__class__ = Scaled
    report = vitfast.patch_model(model)
    left = {l.name: l.reason for l in report.left}
    assert left["encoder.layers.0.blocks.0"].startswith("attention is "), str(report)
    assert left["encoder.layers.1.blocks.1"].startswith("attention.output is "), str(report)
    assert "its own forward would be skipped" in left["encoder.layers.1.blocks.1"]
    assert len([r for r in report.patched if r.kind == "window_attention"]) == 2


def test_backbones_of_models_off_the_interface_are_switched():
    """Mask2Former does not use the attention interface; its Swin backbone does and was left on "sdpa" (the whole
    subtree was taken as handled). It is switched, reported, restored by unpatch, and a second patch changes
    nothing (its Swin layers were bound and reported again)."""
    backbone = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                       num_heads=[1, 1, 2, 2], window_size=2,
                                       out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=5, num_labels=3)
    model = transformers.Mask2FormerModel(config).eval()
    original = copy.deepcopy(model)
    encoder = model.pixel_level_module.encoder
    report = vitfast.patch_model(model)
    switched = [p for p in report.patched if p.kind == "attention" and p.name == "pixel_level_module.encoder"]
    assert switched and encoder.config._attn_implementation == vt.NAME, str(report)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).pixel_decoder_last_hidden_state,
                                   original(pixel_values=x).pixel_decoder_last_hidden_state, atol=2e-5, rtol=1e-4)
    again = vitfast.patch_model(model)
    assert not again.patched and encoder.config._attn_implementation == vt.NAME, str(again)
    vitfast.unpatch_model(model)
    assert encoder.config._attn_implementation == "sdpa"


def test_patching_sub_configs_without_sub_models_logs_no_warning():
    """SamModel's prompt-encoder and mask-decoder configs have no sub-model: transformers warned of "undefined
    behavior" for each when patch_model set vitfast's name on them (the mask decoder's attention reads it)."""
    import logging

    config = transformers.SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, output_channels=16,
                           image_size=64, patch_size=8, window_size=2, global_attn_indexes=[0], mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16))
    model = transformers.SamModel(config)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("transformers.modeling_utils")
    log.addHandler(handler)
    try:
        vitfast.patch_model(model)
    finally:
        log.removeHandler(handler)
    assert model.config.mask_decoder_config._attn_implementation == vt.NAME
    assert not [r for r in records if "without finding the associated sub-model" in r.getMessage()]


@pytest.mark.parametrize("backend,device", CASES)
def test_detr_self_and_cross_attention_with_padding(backend, device):
    model = _detr()
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)
    pixel_mask[1, :, 64:] = 0
    inputs = {"pixel_values": torch.randn(2, 3, 96, 128), "pixel_mask": pixel_mask}
    _compare(*_pair(model, device), backend, inputs, lambda o: o.last_hidden_state)


@pytest.mark.parametrize("backend,device", CASES)
def test_swin_bias_and_shift_mask_through_the_interface(backend, device):
    config = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 1], num_heads=[2, 2],
                                     window_size=4)
    model = transformers.SwinModel(config, add_pooling_layer=False)
    _compare(*_pair(model, device), backend, {"pixel_values": torch.randn(1, 3, 32, 32)},
             lambda o: o.last_hidden_state)


def test_attention_sinks_run_the_models_eager_attention():
    """GPT-OSS's learned sinks join each row's softmax: a forced backend ran vitfast.attention without them (logits
    off by half their scale), and a model built for flex_attention was switched to vitfast's SDPA path, which has no
    sinks either (the original refuses sinks on CPU, the patched one answered wrongly). Calls with sinks run the
    module's eager attention; a model built for flex or flash attention keeps it."""
    config = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                       num_experts_per_tok=1, sliding_window=4, max_position_embeddings=64,
                                       layer_types=["sliding_attention", "full_attention"])
    config._attn_implementation = "eager"
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 2.0)  # (trained sinks are far from their initial zeros)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)
    with torch.no_grad():
        expected = model(ids).logits
        for backend in ("auto", "cpp", "torch"):
            with vitfast.use_backend(backend):
                torch.testing.assert_close(patched(ids).logits, expected, atol=1e-5, rtol=1e-5, msg=backend)
    config._attn_implementation = "flex_attention"
    flex = transformers.GptOssForCausalLM(config)
    report = vitfast.patch_model(flex)
    assert flex.config._attn_implementation == "flex_attention"
    assert any("'flex_attention' kept: vitfast replaces 'eager' and 'sdpa'" in left.reason for left in report.left)
    # (a top config on flex with towers on SDPA: the towers are switched; only the top name decided)
    text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       vocab_size=100, max_position_embeddings=16)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    clip = transformers.CLIPModel._from_config(
        transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16),
        attn_implementation={"": "flex_attention", "text_config": "sdpa", "vision_config": "sdpa"})
    vitfast.patch_model(clip)
    assert (clip.config.text_config._attn_implementation, clip.config.vision_config._attn_implementation) == (
        vt.NAME, vt.NAME)


def test_a_sub_model_patched_with_and_after_its_model_is_restored():
    """A VLM patched, then its vision tower (a PreTrainedModel of its own): the tower recorded vitfast's name as its
    original and was reported patched again; unpatching the VLM left the tower on vitfast's attention (either order)."""
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2)
    for tower_first in (False, True):
        model = transformers.LlavaForConditionalGeneration(
            transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=99))
        tower = model.model.vision_tower
        assert tower.config._attn_implementation == "sdpa"
        first, second = (tower, model) if tower_first else (model, tower)
        vitfast.patch_model(first)
        report = vitfast.patch_model(second)
        assert tower.config._attn_implementation == vt.NAME
        if not tower_first:
            assert any(l.name == "" and l.reason == "already patched (attn_implementation)" for l in report.left)
        vitfast.unpatch_model(first)
        vitfast.unpatch_model(second)
        assert (tower.config._attn_implementation, model.config.text_config._attn_implementation) == ("sdpa",
                                                                                                        "sdpa")


def test_eager_masks_under_autocast_average_a_fully_padded_row():
    """A model that ran eager, patched, under CPU bfloat16 autocast on a forced backend: eager's finfo(float32).min
    padding became -inf in the region's dtype, so a fully padded text gave zeros where eager averages over the keys
    (CLIP's text tower: outputs off by O(1))."""
    config = transformers.CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8)
    config._attn_implementation = "eager"
    model = transformers.CLIPTextModel(config).eval()
    patched = copy.deepcopy(model)
    vitfast.patch_model(patched)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])  # (the second text: every token padding)
    for dtype in (torch.bfloat16, torch.float16):  # (float16's -65504 did not swamp the scores: eager runs there)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            expected = model(ids, attention_mask=mask).last_hidden_state.float()
            for backend in ("cpp", "torch"):
                with vitfast.use_backend(backend):
                    out = patched(ids, attention_mask=mask).last_hidden_state.float()
                torch.testing.assert_close(out, expected, atol=0.05, rtol=0.05, msg=f"{backend} {dtype}")


def test_attention_of_its_own_in_a_transformers_model_is_reported_left():
    """Attention modules of a transformers model that do not go through the attention interface (Swin-V2's) are not
    patched, and were missing from the report, which listed only those that do as covered."""
    model = transformers.Swinv2Model(transformers.Swinv2Config(embed_dim=16, depths=[2], num_heads=[2], window_size=4,
                                                               image_size=32))
    report = vitfast.patch_model(model)
    left = {l.name: l.reason for l in report.left}
    assert left.get("encoder.layers.0.blocks.0.attention.self") == "no vitfast adapter for this class", str(report)
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=48, image_size=16, patch_size=8))
    report = vitfast.patch_model(vit)  # (its attention runs through the interface: covered by the model's record)
    assert not [l for l in report.left if "Attention" in l.cls], str(report)


def _copied_module(original: str, name: str):
    """A tiny instance of transformers' class `name` ("<model module>.<class>"), a copy of `original`'s source, built
    from the config `original` takes, and an input for it."""
    module, cls = name.split(".")
    try:
        cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)
    except (ImportError, AttributeError):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    kind = original.rsplit(".", 1)[1]
    if kind == "ViTPatchEmbeddings":
        config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16)
        return cls(config), torch.randn(2, 3, 16, 16)
    if kind == "VitDetMlp":
        return cls(transformers.VitDetConfig(hidden_act="gelu"), in_features=16, hidden_features=24), \
            torch.randn(2, 3, 3, 16)
    if kind == "SamMLPBlock":
        config = transformers.SamVisionConfig(hidden_size=16, mlp_dim=24, hidden_act="gelu")
        return cls(config), torch.randn(2, 3, 3, 16)
    return cls(transformers.ViTConfig(hidden_size=16, intermediate_size=24, hidden_act="gelu")), torch.randn(2, 5, 16)


@pytest.mark.parametrize("original,name", [
    pytest.param(original, name, id=name) for original, names in vt.COPIES.items() for name in names
    if "Attention" not in original])  # (the SAM attention copies: test_sam_integrations.py, in whole encoders)
def test_copies_of_adapted_classes_are_patched_as_the_original(original, name):
    module, x = _copied_module(original, name)
    report = _patched_equal(module, x, "auto")
    kind = "patch_embed" if original.endswith("PatchEmbeddings") else "linear_gelu"
    assert [(p.name, p.kind) for p in report.patched if p.kind != "linear"] == [("", kind)], str(report)
