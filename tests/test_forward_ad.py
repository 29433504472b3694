"""Forward-mode AD and torch.func: vitfast's ops have reverse-mode autograd through torch.autograd only. A torch.library
op would drop a forward-mode tangent without a word (torch.func.jvp returned zeros), and under torch.func's gradient
transforms its registered autograd fails with an internal error, so every public op raises a clear error instead."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import vitfast


def _r(*shape):
    return torch.randn(*shape, dtype=torch.float64)


OPS = {
    "attention": (lambda q: vitfast.attention(q, q, q), _r(1, 2, 5, 8)),
    "flash_attn_func": (lambda q: vitfast.flash_attn_func(q, q, q), _r(1, 5, 2, 8)),
    "layer_norm": (lambda x: vitfast.layer_norm(x, 8), _r(3, 8)),
    "linear_gelu": (lambda x: vitfast.linear_gelu(x, torch.ones(4, 8, dtype=x.dtype)), _r(3, 8)),
    "patch_embed": (lambda img: vitfast.patch_embed(img, torch.ones(4, 3, 2, 2, dtype=img.dtype), None, 2),
                    _r(1, 3, 4, 4)),
    "patch_merging": (lambda x: vitfast.patch_merging(x, None, None, torch.ones(4, 8, dtype=x.dtype)),
                      _r(1, 4, 4, 2)),
    "rel_pos_attention": (lambda q: vitfast.rel_pos_attention(q, q, q, q[..., :2], q[..., :3]), _r(1, 2, 6, 8)),
    "window_attention": (lambda qkv: vitfast.window_attention(qkv, torch.zeros(9, 2, dtype=qkv.dtype), 2),
                         _r(1, 4, 4, 3, 2, 4)),
    "shifted_window_attention": (
        lambda x: vitfast.shifted_window_attention(x, torch.ones(24, 8, dtype=x.dtype), torch.ones(8, 8, dtype=x.dtype),
                                                   torch.zeros(9, 2, dtype=x.dtype), [2, 2], 2, [1, 1]),
        _r(1, 4, 4, 8)),
}


@pytest.mark.parametrize("op", list(OPS))
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent(op):
    fn, x = OPS[op]
    fn(x)  # runs without a tangent
    with pytest.raises(NotImplementedError, match=f"vitfast.{op} has no forward-mode AD"):
        torch.func.jvp(fn, (x,), (torch.ones_like(x),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        fn(fwAD.make_dual(x, torch.ones_like(x)))
    with fwAD.dual_level():  # a dual level without tangents on these inputs: runs
        fn(x)


@pytest.mark.parametrize("op", list(OPS))
def test_torch_func_gradient_transforms_raise_clearly(op):
    fn, x = OPS[op]
    for transform in (lambda: torch.func.grad(lambda t: fn(t).sum())(x),
                      lambda: torch.func.vjp(fn, x)):
        with pytest.raises(NotImplementedError, match=f"vitfast.{op} does not run under torch.func's gradient"):
            transform()


# the op whose backward a public function calls (its name in the error)
_BACKWARD_OP = {"flash_attn_func": "attention", "shifted_window_attention": "window_attention"}


@pytest.mark.parametrize("op", list(OPS))
def test_double_backward_raises_clearly_or_matches_the_reference(op):
    """A gradient taken with create_graph=True runs; differentiating it again raises a clear NotImplementedError
    (the backward ops have no autograd of their own), except linear_gelu, whose backward is ATen's ops and so has
    second-order gradients: those match plain PyTorch's."""
    fn, x = OPS[op]
    x = x.clone().requires_grad_()
    g, = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
    if op == "linear_gelu":
        x0 = x.detach().clone().requires_grad_()
        g0, = torch.autograd.grad(torch.nn.functional.gelu(torch.nn.functional.linear(
            x0, torch.ones(4, 8, dtype=x0.dtype))).square().sum(), x0, create_graph=True)
        torch.testing.assert_close(torch.autograd.grad(g.square().sum(), x)[0],
                                   torch.autograd.grad(g0.square().sum(), x0)[0])
        return
    with pytest.raises(NotImplementedError, match=f"vitfast.{_BACKWARD_OP.get(op, op)} has no double backward"):
        g.square().sum().backward()


def test_patched_models_run_their_original_code_under_torch_func():
    """Per-sample gradients of a patched model (torch.func.grad over functional_call) equal the original's."""
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.MultiheadAttention(8, 2, batch_first=True))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.mha = model[0], model[1]

        def forward(self, x):
            h = self.norm(x)
            return self.mha(h, h, h, need_weights=False)[0]
    net = Net().double()
    x = _r(2, 5, 8)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p):
        return torch.func.functional_call(net, p, (x,)).square().sum()
    ref = torch.func.grad(loss)(params)
    vitfast.patch_model(net)
    with vitfast.use_backend("torch"):  # the fused path but for torch.func
        got = torch.func.grad(loss)(params)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=name)


def test_patched_models_run_their_original_code_under_forward_ad():
    """torch.func.jvp and dual tensors through a patched model (a Swin block: window attention, LayerNorm, MLP) give
    the original's tangents: its modules run their original code while a forward-AD level is open."""
    from _optional_libs import import_or_skip

    timm = import_or_skip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=2,
                              embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, num_classes=5).double().eval()
    x, t = _r(2, 3, 16, 16), _r(2, 3, 16, 16)
    ref = torch.func.jvp(model, (x,), (t,))
    vitfast.patch_model(model)
    with vitfast.use_backend("cpp"):  # the fused path but for forward AD
        got = torch.func.jvp(model, (x,), (t,))
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(model(fwAD.make_dual(x, t)))
    for g in (got, (dual.primal, dual.tangent)):
        torch.testing.assert_close(g[0], ref[0])
        torch.testing.assert_close(g[1], ref[1])


def test_patched_transformers_attention_runs_the_original_under_torch_func():
    """transformers' attention interface (attn_implementation="vitfast") is no patched method: on a forced backend it
    called vitfast.attention under torch.func.grad, which raised; it now runs transformers' SDPA path there, as every
    patched module runs its original."""
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
        patch_size=8), add_pooling_layer=False).double().eval()
    x = _r(2, 3, 16, 16)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).last_hidden_state.square().sum()
    ref = torch.func.grad(loss)(params)
    vitfast.patch_model(model)
    with vitfast.use_backend("torch"):
        got = torch.func.grad(loss)(params)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=name)
