"""Fused patch embedding: reference, torch.library ops, autograd, functional API.

`vitfast.patch_embed` computes, in one pass over the image, what ViT/DeiT/Swin do in several:

    z = conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)   # (B, L, E)
    z = LayerNorm(z)                                  # optional (Swin's patch_norm; timm's PatchEmbed.norm)
    out = cat([prefix_tokens.expand(B, -1, -1), z], 1) + pos_embed               # (B, P + L, E)

The order follows timm: the norm belongs to the patch embedding and sees only patch tokens; prefix tokens
(class, distillation) and the positional embedding are added after it.

pos_embed is (1, rows, E) or (rows, E). rows == P + L (timm's default) gives every token its row;
rows == L (timm's `no_embed_class=True`) gives only the patch tokens one and leaves the prefix tokens without.
Any other row count is taken as a square grid (after P prefix rows if rows - P is a square, else without)
and resampled to the image's (Hp, Wp) grid with timm's bicubic, antialiased interpolation: the (L, L_old)
interpolation matrix is computed once per (old grid, new grid, device, dtype) and cached (the 16 used last), so a
call costs one small matmul (differentiable, so pos_embed still trains); a torch.compile'd graph builds it in the
graph. A float64 table is resampled in float64 (timm's in float32), others in float32.

`vitfast::patch_embed` (forward) and `vitfast::patch_embed_backward` are torch.library ops with fake
implementations; each picks its backend at run time: "triton" (vitfast.triton.patch_embed), "cpp" (the
extension's vitfast::patch_embed_fwd/_bwd), or "torch" (plain PyTorch below). The LayerNorm epilogue's saved
state (pre-norm tokens, mean, rstd in fp32) is vitfast.layer_norm's, so its backward is vitfast's
layer_norm_backward op. Under autocast the op follows `_autocast_rule` (the rule of the unfused sequence).
"""
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from vitfast import autocast as _autocast
from vitfast import backend as _backend
from vitfast.ops import layer_norm as _ln
from vitfast.ops.window_attention import _pair

OP = "patch_embed"


def patch_embed_ref(images: Tensor, weight: Tensor, bias: Optional[Tensor], patch_size, *,
                    pos_embed: Optional[Tensor] = None, num_prefix_tokens: int = 0,
                    prefix_tokens: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
                    norm_bias: Optional[Tensor] = None, eps: float = 1e-5, norm: bool = False) -> Tensor:
    """The textbook sequence: conv2d + flatten + transpose (+ LayerNorm) + cat prefix + add pos_embed.

    pos_embed must already match the grid (rows P + L or L). `norm=True` (or a norm weight/bias) applies it.
    """
    B = images.shape[0]
    x = F.conv2d(images, weight, bias, stride=_pair(patch_size, "patch_size", "vitfast.patch_embed"))
    x = x.flatten(2).transpose(1, 2)
    E = x.shape[-1]
    if norm or norm_weight is not None or norm_bias is not None:
        x = F.layer_norm(x, (E,), norm_weight, norm_bias, eps)
    P = num_prefix_tokens if prefix_tokens is None else prefix_tokens.reshape(-1, E).shape[0]
    if P:
        pre = (prefix_tokens.reshape(1, P, E).expand(B, P, E) if prefix_tokens is not None
               else x.new_zeros(B, P, E))
        if pos_embed is not None and pos_embed.reshape(-1, E).shape[0] == x.shape[1]:
            return torch.cat([pre, x + pos_embed.reshape(1, -1, E)], 1)
        x = torch.cat([pre, x], 1)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, -1, E)
    return x


# ---------------------------------------------------------------------------------------------------------
# Positional-embedding resampling: the interpolation matrix cached per sizes, the product formed per call (a
# resampled table cached per tensor address and version went stale where a new table took a freed one's address,
# or was edited through .data, which bumps no version).

_RESIZE_CACHE: dict = {}
_RESIZE_CACHE_SIZE = 16  # matrices kept, the least recently used dropped first (a server sees many image sizes:
# 64 MB each at SAM's 64 x 64 grid)


def _resize_matrix(old_grid: Tuple[int, int], new_grid: Tuple[int, int], mode: str, antialias: bool,
                   device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """(new_h*new_w, old_h*old_w) matrix R (fp32, or fp64 for fp64 tables) with interpolate(table) == R @ table,
    computed once per sizes, device and dtype among the _RESIZE_CACHE_SIZE used last, outside inference mode (a
    cached inference tensor failed a later training call); built anew in the graph, and not cached, while
    torch.compile or a fake mode traces (torch.export, FakeTensorMode: a cached fake matrix gave later eager calls
    fake outputs, a cached real one failed the trace, and so did one an eager call had cached before a compiled
    call's recompile for symbolic sizes)."""
    def build():
        n_old = old_grid[0] * old_grid[1]
        with torch.no_grad():
            # the basis as timm lays out the table: one image of n_old channels, channels last (torch 2.13's CPU
            # antialiased kernel for channels-first inputs drops the height resize where the new width is 1)
            basis = torch.eye(n_old, device=device, dtype=dtype).reshape(1, *old_grid, n_old).permute(0, 3, 1, 2)
            resized = F.interpolate(basis, size=new_grid, mode=mode, antialias=antialias,
                                    align_corners=False if mode in ("bilinear", "bicubic") else None)
            return resized.reshape(n_old, -1).t().contiguous()

    # (Dynamo cannot trace detect_fake_mode: asked second)
    if torch.compiler.is_dynamo_compiling() or torch._guards.detect_fake_mode() is not None:
        return build()
    key = (old_grid, new_grid, mode, antialias, device, dtype)
    mat = _RESIZE_CACHE.pop(key, None)  # (put back last: the least recently used go first)
    if mat is None:
        for old in list(_RESIZE_CACHE)[:max(0, len(_RESIZE_CACHE) - _RESIZE_CACHE_SIZE + 1)]:  # (threads may add)
            _RESIZE_CACHE.pop(old, None)
        with torch.inference_mode(False):
            mat = build()
    _RESIZE_CACHE[key] = mat
    return mat


_MODES = ("bicubic", "bilinear", "nearest", "nearest-exact", "area")


def _grid(name: str, what: str, grid) -> Tuple[int, int]:
    """`grid` as two positive Python ints (a tuple or list of integers or 0-d integer tensors, a NumPy array or
    tensor of two integers), else ValueError."""
    items = grid.tolist() if isinstance(grid, torch.Tensor) or type(grid).__module__ == "numpy" else grid
    if isinstance(items, (tuple, list)):  # (0-d tensors of integers, as timm takes them)
        items = [v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v for v in items]
    out = tuple(int(v) for v in items) if isinstance(items, (tuple, list)) and len(items) == 2 and all(
        isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool) for v in items) else ()
    if not out or min(out) < 1:
        raise ValueError(f"{name}: {what} must be two positive integers (h, w), got {grid!r}")
    return out


def resample_pos_embed(pos_embed: Tensor, new_grid: Sequence[int], old_grid: Optional[Sequence[int]] = None,
                       num_prefix_tokens: int = 0, mode: str = "bicubic", antialias: bool = True) -> Tensor:
    """timm's resample_abs_pos_embed (its `interpolation` is `mode` here) with a cached interpolation matrix.

    Args:
        pos_embed: (1, P + h*w, E) or (P + h*w, E), P = num_prefix_tokens leading rows left as they are (0 by
            default; timm's resample_abs_pos_embed defaults to 1).
        new_grid: (Hp, Wp), positive. old_grid: (h, w); a square grid when None.
        mode: F.interpolate's 2-D mode: "bicubic" (timm's default), "bilinear", "nearest", "nearest-exact", "area".
        antialias: F.interpolate's antialias (timm's default True), for "bilinear" and "bicubic" only.
    Returns:
        (1, P + Hp*Wp, E) in pos_embed's dtype. Differentiable in pos_embed. The (Hp*Wp, h*w) interpolation
        matrix is computed once per sizes, mode, device and dtype (float64 for a float64 table, else float32; the
        16 used last kept); each call forms its product with the table.
    Raises:
        ValueError: pos_embed not (1, rows, E) or (rows, E), or not floating point; num_prefix_tokens not an
        integer in [0, rows) (no patch rows left); a grid not two positive integers; old_grid None and the h*w
        patch rows not a square, or old_grid's h*w not their count; an unknown mode, or antialias with a mode other
        than "bilinear" or "bicubic".
    """
    name = "vitfast.resample_pos_embed"
    if pos_embed.dim() not in (2, 3) or pos_embed.dim() == 3 and pos_embed.shape[0] != 1 or pos_embed.shape[-1] < 1:
        raise ValueError(f"{name}: pos_embed must be (1, rows, E) or (rows, E), E >= 1, got "
                         f"{tuple(pos_embed.shape)}")
    if not pos_embed.is_floating_point():
        raise ValueError(f"{name}: pos_embed must be a floating-point table, got {pos_embed.dtype}")
    if mode not in _MODES:
        raise ValueError(f"{name}: mode {mode!r} is not one of {', '.join(map(repr, _MODES))}")
    if antialias and mode not in ("bilinear", "bicubic"):
        raise ValueError(f"{name}: antialias=True takes mode 'bilinear' or 'bicubic', not {mode!r}")
    E = pos_embed.shape[-1]
    table = pos_embed.reshape(-1, E)
    if not (isinstance(num_prefix_tokens, numbers.Integral) and 0 <= num_prefix_tokens < table.shape[0]):
        raise ValueError(f"{name}: num_prefix_tokens={num_prefix_tokens!r} is not an integer in [0, "
                         f"{table.shape[0]}), below the rows of pos_embed {tuple(pos_embed.shape)}")
    n_old = table.shape[0] - num_prefix_tokens
    new_grid = _grid(name, "new_grid", new_grid)
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise ValueError(f"{name}: {n_old} patch rows of pos_embed {tuple(pos_embed.shape)} "
                             f"are not a square grid; pass old_grid")
        old_grid = (side, side)
    old_grid = _grid(name, "old_grid", old_grid)
    if old_grid[0] * old_grid[1] != n_old:
        raise ValueError(f"{name}: old_grid {old_grid} does not match the {n_old} patch rows "
                         f"of pos_embed {tuple(pos_embed.shape)}")
    if old_grid == new_grid:
        return table.unsqueeze(0)
    dtype = torch.float64 if pos_embed.dtype == torch.float64 else torch.float32
    mat = _resize_matrix(old_grid, new_grid, mode, antialias, pos_embed.device, dtype)
    with _autocast.disabled(pos_embed.device):  # F.interpolate's result, which autocast leaves in float32
        patch = (mat @ table[num_prefix_tokens:].to(dtype)).to(pos_embed.dtype)
    return torch.cat([table[:num_prefix_tokens], patch], 0).unsqueeze(0)


# ---------------------------------------------------------------------------------------------------------
# Backends.

def _prefix_rows(prefix, pos, num_prefix, pos_offset, dtype):
    """The (P, E) values of the prefix slots: prefix tokens plus their positional rows, or None for zeros."""
    if num_prefix == 0:
        return None
    rows = prefix
    if pos is not None and pos_offset == num_prefix:
        rows = pos[:num_prefix] if rows is None else rows + pos[:num_prefix]
    return rows.to(dtype) if rows is not None else None


def _patches(images: Tensor, ph: int, pw: int) -> Tensor:
    """(B*L, C*ph*pw) patch matrix in the conv weight's (c, i, j) order: one copy of a strided view. Pixels past
    the last whole patch are dropped, as the stride = kernel convolution drops them."""
    B, C, H, W = images.shape
    Hp, Wp = H // ph, W // pw
    v = images[:, :, :Hp * ph, :Wp * pw].reshape(B, C, Hp, ph, Wp, pw).permute(0, 2, 4, 1, 3, 5)
    return v.reshape(B * Hp * Wp, C * ph * pw)


def _prefix_and_pos(tokens, pos, pos_offset, prefix, num_prefix):
    """(B, L, E) patch tokens -> (B, P + L, E): the P prefix slots (prefix rows or zeros), then the patch tokens,
    each plus its positional row; mixed dtypes promote as the unfused cat and add promote them."""
    B, L, E = tokens.shape
    patch = tokens if pos is None else tokens + pos[pos_offset:pos_offset + L]
    if num_prefix == 0:
        return patch
    dtype = patch.dtype if prefix is None else torch.promote_types(patch.dtype, prefix.dtype)
    rows = _prefix_rows(prefix, pos, num_prefix, pos_offset, dtype)
    slots = rows.expand(B, num_prefix, E) if rows is not None else patch.new_zeros(B, num_prefix, E)
    return torch.cat([slots, patch], 1)


def _fwd_torch(images, weight, bias, pos, pos_offset, prefix, nw, nb, has_norm, num_prefix, eps, store_z):
    B, C, H, W = images.shape
    E, _, ph, pw = weight.shape
    L = (H // ph) * (W // pw)
    # (contiguous: at B = 1 the reshape is a view of the conv's output, strides (1, L), where the op promises rows)
    z = F.conv2d(images, weight, bias, stride=(ph, pw)).flatten(2).transpose(1, 2).reshape(B * L, E).contiguous()
    stats = torch.float64 if images.dtype == torch.float64 else torch.float32
    mean = images.new_empty(0, dtype=stats)
    rstd = images.new_empty(0, dtype=stats)
    tokens = z
    if has_norm:
        tokens, _, mean, rstd = _ln._fwd_torch(z, nw, nb, None, eps)
    out = _prefix_and_pos(_backend.output_view(tokens, (B, L, E)), pos, pos_offset, prefix, num_prefix)
    return out, (z if has_norm and store_z else images.new_empty(0)), mean, rstd


def _bwd_torch(dz, images, weight, has_bias, need_dimages, need_dweight):
    B, C, H, W = images.shape
    E, _, ph, pw = weight.shape
    Hp, Wp = H // ph, W // pw
    dz2 = dz.reshape(B * Hp * Wp, E)
    acc = torch.float64 if images.dtype == torch.float64 else torch.float32
    dweight, dbias = weight.new_empty(0), weight.new_empty(0)
    if need_dweight:
        dweight = (dz2.t().to(acc) @ _patches(images, ph, pw).to(acc)).to(weight.dtype).view(weight.shape)
        if has_bias:
            dbias = dz2.to(acc).sum(0).to(weight.dtype)
    if need_dimages:
        cols = dz2 @ weight.reshape(E, -1)  # (B*L, C*ph*pw)
        dpatches = cols.view(B, Hp, Wp, C, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(B, C, Hp * ph, Wp * pw)
        # The pixels the convolution drops get a zero gradient.
        dimages = F.pad(dpatches, (0, W - Wp * pw, 0, H - Hp * ph))
    else:
        dimages = images.new_empty(0)
    return dimages, dweight, dbias


def _check_support(backend: str, tensors: tuple) -> Optional[str]:
    x = tensors[0]
    if backend == "cpp" and not hasattr(torch.ops.vitfast, "patch_embed_fwd"):
        return "vitfast._C was built without patch_embed_fwd; rebuild the extension"
    if backend == "triton":
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {x.dtype} (Triton takes float32, float16, bfloat16)"
    return None


_backend.register_op(OP, gpu_order=("triton", "torch"), cpu_order=("cpp", "torch"), check=_check_support)


def _norm_support(backend: str, E: int) -> Optional[str]:
    if backend == "triton":
        from vitfast.triton.patch_embed import MAX_NORM_E
        if E > MAX_NORM_E:
            return f"the LayerNorm epilogue takes embed dims up to {MAX_NORM_E}, got {E}"
    return None


def _num_patches(op: str, images: Tensor, weight: Tensor) -> int:
    """L = (H // ph) * (W // pw), for the ops called directly, after checking that images (B, C, H, W) and weight
    (E, C, ph, pw) agree and the patch is not empty."""
    if (images.dim() != 4 or weight.dim() != 4 or images.shape[1] != weight.shape[1] or weight.shape[2] < 1
            or weight.shape[3] < 1):
        raise ValueError(f"vitfast::{op}: images (B, C, H, W) and weight (E, C, ph, pw) do not agree (or an empty "
                         f"patch): {tuple(images.shape)}, {tuple(weight.shape)}")
    return (images.shape[2] // weight.shape[2]) * (images.shape[3] // weight.shape[3])


@torch.library.custom_op("vitfast::patch_embed", mutates_args=())
def _patch_embed_op(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
                    pos_offset: int, prefix_tokens: Optional[Tensor], norm_weight: Optional[Tensor],
                    norm_bias: Optional[Tensor], has_norm: bool, num_prefix: int, eps: float,
                    store_z: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """images (B, C, H, W); weight (E, C, ph, pw); pos_embed (rows, E) contiguous, patch l reads row
    pos_offset + l (pos_offset == num_prefix: the first rows belong to the prefix tokens);
    prefix_tokens (num_prefix, E) or None (zero slots). Returns out (B, num_prefix + L, E), the pre-norm
    tokens z (B*L, E) (empty unless has_norm and store_z), mean, rstd (B*L,) (empty without norm)."""
    if num_prefix < 0 or pos_offset < 0:  # (the kernels would write before the output)
        raise ValueError(f"vitfast.patch_embed: num_prefix and pos_offset must be >= 0, got {num_prefix}, {pos_offset}")
    E, L = weight.shape[0], _num_patches(OP, images, weight)
    rows = pos_embed.shape[0] if pos_embed is not None and pos_embed.dim() == 2 else pos_offset + L
    _backend.check_op_shapes(OP, {"bias": (bias, (E,)), "norm_weight": (norm_weight, (E,)),
                                  "norm_bias": (norm_bias, (E,)), "prefix_tokens": (prefix_tokens, (num_prefix, E)),
                                  "pos_embed": (pos_embed, (max(rows, pos_offset + L), E))})
    which = _backend.choose_backend(OP, images, weight, bias, pos_embed, prefix_tokens, norm_weight, norm_bias)
    reason = _norm_support(which, weight.shape[0]) if has_norm else None
    if reason is not None:
        if _backend.forced_backend() is not None:
            raise ValueError(f"vitfast.patch_embed: the forced {which} backend cannot run: {reason}")
        _backend.log.debug("%s: %s backend skipped: %s", OP, which, reason)
        which = "torch"
    if which == "triton":
        from vitfast.triton.patch_embed import patch_embed_fwd
        rows = _prefix_rows(prefix_tokens, pos_embed, num_prefix, pos_offset, images.dtype)
        return patch_embed_fwd(images, weight, bias, pos_embed, pos_offset, rows, norm_weight, norm_bias,
                               has_norm, num_prefix, eps, store_z)
    if which in ("cpp", "cuda"):
        return tuple(torch.ops.vitfast.patch_embed_fwd(images, weight, bias, pos_embed, pos_offset, prefix_tokens,
                                                       norm_weight, norm_bias, has_norm, num_prefix, eps, store_z))
    return _fwd_torch(images, weight, bias, pos_embed, pos_offset, prefix_tokens, norm_weight, norm_bias, has_norm,
                      num_prefix, eps, store_z)


@_patch_embed_op.register_fake
def _(images, weight, bias, pos_embed, pos_offset, prefix_tokens, norm_weight, norm_bias, has_norm, num_prefix,
      eps, store_z):
    B, _, H, W = images.shape
    E, _, ph, pw = weight.shape
    L = (H // ph) * (W // pw)
    M = B * L
    stats = torch.float64 if images.dtype == torch.float64 else torch.float32
    return (images.new_empty(B, num_prefix + L, E),
            images.new_empty((M, E) if has_norm and store_z else (0,)),
            images.new_empty(M if has_norm else 0, dtype=stats), images.new_empty(M if has_norm else 0, dtype=stats))


@torch.library.custom_op("vitfast::patch_embed_backward", mutates_args=())
def _patch_embed_backward_op(dz: Tensor, images: Tensor, weight: Tensor, has_bias: bool, need_dimages: bool,
                             need_dweight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dz (B, L, E), unit inner stride: gradient of the tokens before pos_embed (after the norm's backward).
    Returns dimages (B, C, H, W) or empty (not need_dimages), dweight (E, C, ph, pw) and dbias (E,), or empty (not
    need_dweight, for both; not has_bias, for dbias)."""
    L = _num_patches(f"{OP}_backward", images, weight)
    _backend.check_op_shapes(f"{OP}_backward", {"dz": (dz, (images.shape[0], L, weight.shape[0]))})
    which = _backend.choose_backend(OP, images, weight, dz)
    if which == "triton":
        from vitfast.triton.patch_embed import patch_embed_bwd
        return patch_embed_bwd(dz, images, weight, has_bias, need_dimages, need_dweight)
    if which in ("cpp", "cuda"):
        return tuple(torch.ops.vitfast.patch_embed_bwd(dz, images, weight, has_bias, need_dimages, need_dweight))
    return _bwd_torch(dz, images, weight, has_bias, need_dimages, need_dweight)


@_patch_embed_backward_op.register_fake
def _(dz, images, weight, has_bias, need_dimages, need_dweight):
    return (images.new_empty(images.shape if need_dimages else (0,)),
            weight.new_empty(weight.shape if need_dweight else (0,)),
            weight.new_empty(weight.shape[0] if has_bias and need_dweight else 0))


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos, pos_offset, prefix, nw, nb, has_norm, num_prefix, eps, store_z = inputs
    _, z, mean, rstd = output
    # (bias for the recomputation of z, which a forward traced without grad, as by torch.export, did not store)
    _backend.save_for_backward(ctx, images, weight, bias if has_norm and not store_z else None, nw, z, mean, rstd)
    ctx.eps = eps
    ctx.has_bias = bias is not None
    ctx.has_pos = pos is not None
    ctx.pos_offset = pos_offset
    ctx.has_prefix = prefix is not None
    ctx.has_norm = has_norm
    ctx.has_nb = nb is not None
    ctx.num_prefix = num_prefix
    ctx.store_z = store_z


def _backward(ctx, dout, dz_unused, dmean, drstd):
    images, weight, bias, nw, z, mean, rstd = ctx.saved_tensors
    P = ctx.num_prefix
    B, T, E = dout.shape
    L = T - P
    dpatch = dout[:, P:] if P else dout  # (P = 0: not an alias view, which is_grads_batched's vmap cannot batch)
    dpos = dprefix = dnw = dnb = None
    if ctx.has_pos and ctx.needs_input_grad[3]:
        dpos = (dout if ctx.pos_offset == P else dpatch).sum(0)
    if ctx.has_prefix and ctx.needs_input_grad[5]:
        dprefix = dout[:, :P].sum(0)
    if ctx.has_norm:
        if not ctx.store_z:  # a graph traced without grad (torch.export, jit.trace) run with grad: recompute z
            z = _patch_embed_op(images, weight, bias, None, 0, None, None, None, False, 0, ctx.eps,
                                False)[0].view(B * L, E)
        d2 = dpatch.reshape(B * L, E)
        d2 = d2 if d2.stride(-1) == 1 else d2.contiguous()
        dz2, dnw, dnb = _ln._layer_norm_backward_op(d2, None, z, nw, mean, rstd, ctx.has_nb)
        dz = dz2.view(B, L, E)
    else:
        dz = dpatch if dpatch.stride(-1) == 1 else dpatch.contiguous()
    # (an image that requires grad into a frozen model, as saliency maps and adversarial attacks: no dweight, dbias)
    need_dweight = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
    dimages, dweight, dbias = _patch_embed_backward_op(dz, images, weight, ctx.has_bias, ctx.needs_input_grad[0],
                                                       need_dweight)
    return (dimages if ctx.needs_input_grad[0] else None, dweight if need_dweight else None,
            dbias if ctx.has_bias and need_dweight else None, dpos, None,
            dprefix, dnw if nw is not None else None, dnb if ctx.has_nb else None, None, None, None, None)


_patch_embed_op.register_autograd(_backward, setup_context=_setup_context)
_backend.no_double_backward(OP, _patch_embed_backward_op)


def _conv_flops(images_shape, weight_shape) -> int:
    """2 B L E K: the stride = kernel convolution's multiply-adds, as torch.utils.flop_counter counts conv2d."""
    B, C, H, W = images_shape
    E, _, ph, pw = weight_shape
    return 2 * B * (H // ph) * (W // pw) * E * C * ph * pw


@register_flop_formula(torch.ops.vitfast.patch_embed)
def _flops(images_shape, weight_shape, *args, **kwargs) -> int:
    """torch.utils.flop_counter's count (FlopCounterMode): the convolution's (bias, LayerNorm, tokens count none)."""
    return _conv_flops(images_shape, weight_shape)


@register_flop_formula(torch.ops.vitfast.patch_embed_backward)
def _backward_flops(dz_shape, images_shape, weight_shape, has_bias, need_dimages, need_dweight, *args,
                    **kwargs) -> int:
    return _conv_flops(images_shape, weight_shape) * (int(need_dimages) + int(need_dweight))


def _autocast_rule(device_type, dtype, images, weight, bias, pos_embed, pos_offset, prefix_tokens, norm_weight,
                   norm_bias, has_norm, num_prefix, eps, store_z):
    """The unfused sequence's rule: the convolution (fused, with its bias) in the region's dtype, as F.conv2d;
    the LayerNorm by vitfast.layer_norm's rule; the prefix tokens and pos_embed then added with type promotion,
    as the unfused cat and add (float32 parameters give float32 tokens). The other outputs, the saved state of
    the op's own autograd, are empty: the ops called here keep their own."""
    images, weight, bias = (_autocast.cast(dtype, t) for t in (images, weight, bias))
    _autocast.check_same_dtype("patch_embed", images=images, weight=weight, bias=bias)
    tokens, _, _, _ = _patch_embed_op(images, weight, bias, None, 0, None, None, None, False, 0, eps, False)
    B, L, E = tokens.shape
    if has_norm:
        normed, _, _, _ = _ln._autocast_rule(device_type, dtype, tokens.view(B * L, E), norm_weight, norm_bias,
                                             None, eps)
        tokens = normed.view(B, L, E)
    out = _prefix_and_pos(tokens, pos_embed, pos_offset, prefix_tokens, num_prefix)
    stats = images.new_empty(0, dtype=torch.float64 if images.dtype == torch.float64 else torch.float32)
    return out, images.new_empty(0), stats, stats.clone()


_autocast.register("patch_embed", _autocast_rule)
_autocast.register("patch_embed_backward", _autocast.keep_dtypes(_patch_embed_backward_op))


# ---------------------------------------------------------------------------------------------------------
# Public API.

def _dtype_fits(t: Tensor, images: Tensor) -> bool:
    """A parameter's dtype must be the images' outside autocast; under autocast the rule casts or promotes it."""
    return t.is_floating_point() and (t.dtype == images.dtype or _autocast.is_enabled(images.device))


def _check_vec(name: str, t: Optional[Tensor], images: Tensor, E: int) -> None:
    if t is None:
        return
    # (the LayerNorm's autocast rule takes the tokens in float32: float64 norm parameters only with float64 images,
    # as F.layer_norm refuses the mix)
    norm64 = name.startswith("norm") and t.dtype == torch.float64 and images.dtype != torch.float64
    if tuple(t.shape) != (E,) or not _dtype_fits(t, images) or norm64 or t.device != images.device:
        raise ValueError(f"vitfast.patch_embed: {name} must have shape ({E},), dtype {images.dtype} (under autocast "
                         f"any floating point{', float64 only with float64 images' if name.startswith('norm') else ''}"
                         f") and device {images.device}, got {tuple(t.shape)} {t.dtype} {t.device}")


def patch_embed(images: Tensor, weight: Tensor, bias: Optional[Tensor], patch_size: Union[int, Sequence[int]], *,
                pos_embed: Optional[Tensor] = None, num_prefix_tokens: int = 0,
                prefix_tokens: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
                norm_bias: Optional[Tensor] = None, eps: float = 1e-5, norm: Optional[bool] = None) -> Tensor:
    """Fused ViT/Swin patch embedding: conv (stride = kernel) + bias (+ LayerNorm) + prefix tokens + pos_embed (ViT:
    Dosovitskiy et al., arXiv:2010.11929; timm's PatchEmbed).

    Args:
        images: (B, C, H, W), H >= ph and W >= pw, any strides (channels_last, slices, expanded dims). As with
            the stride = kernel convolution it replaces, the H % ph last rows and W % pw last columns are
            dropped (and get a zero gradient).
        weight: (E, C, ph, pw), the conv kernel (timm's `proj.weight`), any strides. bias: (E,) or None.
        patch_size: int or (ph, pw); must equal the kernel's spatial size (stride = kernel).
        pos_embed: (1, rows, E) or (rows, E), any strides: rows == P + L covers prefix and patch tokens,
            rows == L only the patch tokens; another square grid is resampled (cached, see the module docstring).
            Where rows == L and rows - P is also a square grid (a table with prefix rows for another grid whose
            patch count happens to equal rows), it is read as patch rows only: pass such a table resampled to
            P + L rows (resample_pos_embed) instead.
        num_prefix_tokens: P, the prefix slots at the front of the output (taken from prefix_tokens if given;
            another P > 0 given with it raises ValueError).
        prefix_tokens: (P, E) or (1, P, E) (class, distillation tokens), any strides, broadcast over the batch;
            None leaves the P slots zero (plus their positional rows).
        norm_weight, norm_bias: (E,), any stride: LayerNorm on the patch tokens (before pos_embed), eps its
            epsilon.
        norm: apply the LayerNorm; defaults to True when norm_weight or norm_bias is given.

    Every tensor has the images' dtype and device; under autocast the dtypes may differ, and the op follows the
    unfused sequence's rule: the convolution runs in the region's dtype (as F.conv2d), the LayerNorm by
    `vitfast.layer_norm`'s rule, and prefix tokens and pos_embed are added with type promotion (as the unfused
    cat and add), so float32 prefix tokens or pos_embed give float32 tokens.

    fp32 products are IEEE fp32 unless `torch.backends.cuda.matmul.allow_tf32` allows TF32 (vitfast's fp32 rule,
    vitfast.triton.common; F.conv2d follows torch.backends.cudnn.allow_tf32 instead, True by default).

    Returns:
        (B, P + Hp*Wp, E), Hp = H // ph, Wp = W // pw, contiguous. For Swin (P = 0) `.view(B, Hp, Wp, E)` is
        NHWC.

    Raises:
        ValueError: images not 4-D or not floating point; a patch size below 1; a weight that does not match the
            channels and patch size; no channels (C = 0) or no embedding dims (E = 0); an image smaller than one
            patch (the convolution rejects it too); a parameter of another shape, dtype or device; a pos_embed
            whose rows fit neither the tokens nor a square grid; a negative num_prefix_tokens.
        NotImplementedError: an input with a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad).
    """
    _backend.check_transforms("patch_embed", images, weight, bias, pos_embed, prefix_tokens, norm_weight,
                                 norm_bias)
    ph, pw = _pair(patch_size, "patch_size", "vitfast.patch_embed")
    if images.dim() != 4:
        raise ValueError(f"vitfast.patch_embed: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"vitfast.patch_embed: images must be floating point, got {images.dtype}")
    B, C, H, W = images.shape
    if ph < 1 or pw < 1:
        raise ValueError(f"vitfast.patch_embed: patch_size must be positive, got {(ph, pw)}")
    if weight.dim() != 4 or weight.shape[1] != C or tuple(weight.shape[2:]) != (ph, pw):
        raise ValueError(f"vitfast.patch_embed: weight must be (E, {C}, {ph}, {pw}) for {C}-channel images and "
                         f"patch {(ph, pw)}, got {tuple(weight.shape)}")
    if not _dtype_fits(weight, images) or weight.device != images.device:
        raise ValueError(f"vitfast.patch_embed: weight {weight.dtype} {weight.device} must match the images "
                         f"{images.dtype} {images.device} (in device; in dtype outside autocast)")
    if H < ph or W < pw:
        raise ValueError(f"vitfast.patch_embed: image size ({H}, {W}) is smaller than the patch size ({ph}, {pw})")
    E = weight.shape[0]
    if C == 0 or E == 0:
        raise ValueError(f"vitfast.patch_embed: images {tuple(images.shape)} and weight {tuple(weight.shape)} must "
                         f"have at least one channel and one embedding dim (F.conv2d gives no tokens or raises)")
    for name, t in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        _check_vec(name, t, images, E)
    Hp, Wp = H // ph, W // pw
    if prefix_tokens is not None:
        if prefix_tokens.dim() not in (2, 3) or prefix_tokens.shape[-1] != E or (
                prefix_tokens.dim() == 3 and prefix_tokens.shape[0] != 1):
            raise ValueError(f"vitfast.patch_embed: prefix_tokens must be (P, {E}) or (1, P, {E}), got "
                             f"{tuple(prefix_tokens.shape)}")
        P = prefix_tokens.shape[-2]
        if num_prefix_tokens != 0 and num_prefix_tokens != P:  # (not `not in (0, P)`: P may be symbolic)
            raise ValueError(f"vitfast.patch_embed: num_prefix_tokens={num_prefix_tokens} but prefix_tokens has "
                             f"{P} rows")
        if not _dtype_fits(prefix_tokens, images) or prefix_tokens.device != images.device:
            raise ValueError(f"vitfast.patch_embed: prefix_tokens {prefix_tokens.dtype} {prefix_tokens.device} "
                             f"must match the images {images.dtype} {images.device} (in device; in dtype outside "
                             f"autocast)")
        prefix_tokens = prefix_tokens.reshape(P, E)
    else:
        P = int(num_prefix_tokens)
        if P < 0:
            raise ValueError(f"vitfast.patch_embed: num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    pos_offset = 0
    if pos_embed is not None:
        if pos_embed.dim() not in (2, 3) or pos_embed.shape[-1] != E or (pos_embed.dim() == 3 and
                                                                         pos_embed.shape[0] != 1):
            raise ValueError(f"vitfast.patch_embed: pos_embed must be (1, rows, {E}) or (rows, {E}), got "
                             f"{tuple(pos_embed.shape)}")
        if not _dtype_fits(pos_embed, images) or pos_embed.device != images.device:
            raise ValueError(f"vitfast.patch_embed: pos_embed {pos_embed.dtype} {pos_embed.device} must match "
                             f"the images {images.dtype} {images.device} (in device; in dtype outside autocast)")
        pos_embed, pos_offset = _pos_rows(pos_embed, P, (Hp, Wp))
        pos_embed = pos_embed if pos_embed.is_contiguous() else pos_embed.contiguous()
    has_norm = bool(norm) if norm is not None else (norm_weight is not None or norm_bias is not None)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (images, weight, bias, pos_embed, prefix_tokens, norm_weight,
                                                    norm_bias))
    out, _, _, _ = _patch_embed_op(images, weight, bias, pos_embed, pos_offset, prefix_tokens, norm_weight,
                                   norm_bias, has_norm, P, float(eps), need_grad)
    return out


def _pos_rows(pos_embed: Tensor, P: int, grid: Tuple[int, int]) -> Tuple[Tensor, int]:
    """pos_embed (1, rows, E) or (rows, E) as the (rows, E) table the tokens add (resampled from another square grid)
    and the row the first patch token takes (P where it covers the prefix tokens, else 0)."""
    L, rows = grid[0] * grid[1], pos_embed.shape[-2]
    if rows not in (L, P + L):
        pos_embed = _resample_for(pos_embed, rows, P, grid)
        rows = pos_embed.shape[-2]
    return pos_embed.reshape(rows, pos_embed.shape[-1]), P if rows == P + L else 0


def _resample_for(pos_embed: Tensor, rows: int, P: int, grid: Tuple[int, int]) -> Tensor:
    for prefix in ((P, 0) if P else (0,)):
        n = rows - prefix
        if n > 0 and math.isqrt(n) ** 2 == n:
            return resample_pos_embed(pos_embed, grid, num_prefix_tokens=prefix)
    raise ValueError(f"vitfast.patch_embed: pos_embed has {rows} rows; expected {P + grid[0] * grid[1]} "
                     f"(prefix + patch tokens), {grid[0] * grid[1]} (patch tokens) or a square grid to resample "
                     f"(optionally after {P} prefix rows) for the {grid} patch grid")
