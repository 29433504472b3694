"""Measures, per op and shape class, whether vitfast's CPU kernel or the ATen sequence it replaces is faster, for
inference (torch.inference_mode) and training (forward + backward). The table it prints is what
vitfast.integrations.choice encodes.

    python bench/cpu_choice.py [--reps 9] [--threads 2]

Each row times both implementations interleaved (A, B, B, A, ...: vitfast.report.interleaved) in this one process
and reports the medians and ATen / vitfast (> 1: vitfast faster). The shapes are those of the models of
bench/bench_patched_models.py at batch 1, 2 and 8, and SAM-B's image encoder at 1024 px. Linear rows: "vitfast" is
vitfast.linear (oneDNN where its rule says so) and "ATen" F.linear (MKL's sgemm). linear_gelu rows: "ATen" is what a
patched MLP runs where the table says ATen, vitfast.linear then F.gelu. Weights of both are nn.Parameters, as in a
model. "mlp rows" rows (inference only): "ATen" is a patched MLP (Linear, GELU, Linear; the
torchvision adapter's calls) run in one call, "vitfast" the same run in chunks of rows (integrations/patch.py's
mlp_rows, with the chunk size of choice.py's rule, forced also where the rule would not chunk). Not collected by pytest
(no bench_ prefix): it takes a few minutes (`-k` picks cases).
"""
import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

import vitfast
from vitfast.ops.window_attention import relative_position_index, shifted_window_attention_ref
from vitfast.report import interleaved


def _train(fn, *leaves):
    def step():
        out = fn()
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        for t in leaves:
            t.grad = None
    return step


def _infer(fn):
    def call():
        with torch.inference_mode():
            fn()
    return call


def layer_norm_cases():
    for what, M, N in [("vit_b b1", 197, 768), ("vit_b b8", 8 * 197, 768), ("deit_s b1", 197, 384),
                       ("deit_s b8", 8 * 197, 384), ("clip_b32 b1", 50, 768), ("clip_b32 b8", 400, 768),
                       ("swin s1 b1", 3136, 96), ("swin s1 b8", 8 * 3136, 96), ("swin s4 b1", 49, 768),
                       ("swin s4 b8", 8 * 49, 768)]:
        x = torch.randn(M, N, requires_grad=True)
        r = torch.randn(M, N, requires_grad=True)
        w = torch.randn(N, requires_grad=True)
        b = torch.randn(N, requires_grad=True)
        yield (f"layer_norm {what} ({M}x{N})", lambda: F.layer_norm(x, (N,), w, b, 1e-6),
               lambda: vitfast.layer_norm(x, (N,), w, b, 1e-6), (x, w, b))
        yield (f"layer_norm+residual {what} ({M}x{N})", lambda: F.layer_norm(x + r, (N,), w, b, 1e-6),
               lambda: vitfast.layer_norm(x, (N,), w, b, 1e-6, residual=r), (x, r, w, b))


def attention_cases():
    for what, B, H, N, D in [("vit_b b1", 1, 12, 197, 64), ("vit_b b8", 8, 12, 197, 64), ("deit_s b1", 1, 6, 197, 64),
                             ("deit_s b8", 8, 6, 197, 64), ("clip_b32 b1", 1, 12, 50, 64),
                             ("clip_b32 b8", 8, 12, 50, 64)]:
        q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
        yield (f"attention {what} ({B},{H},{N},{D})", lambda: F.scaled_dot_product_attention(q, k, v),
               lambda: vitfast.attention(q, k, v), (q, k, v))


_INDEX = relative_position_index([7, 7])


def _dense_bias(table, heads):
    """torchvision's per-call gather of the (169, heads) table into a (1, heads, 49, 49) bias."""
    return table[_INDEX].view(49, 49, heads).permute(2, 0, 1).contiguous().unsqueeze(0)


def window_attention_cases():
    for what, B, H, C, heads, shift in [("swin s1 b1", 1, 56, 96, 3, 3), ("swin s1 b8", 8, 56, 96, 3, 3),
                                        ("swin s3 b8", 8, 14, 384, 12, 3), ("swin s4 b8", 8, 7, 768, 24, 0)]:
        x = torch.randn(B, H, H, C, requires_grad=True)
        wq = (torch.randn(3 * C, C) * C ** -0.5).requires_grad_()
        bq = torch.randn(3 * C, requires_grad=True)
        wp = (torch.randn(C, C) * C ** -0.5).requires_grad_()
        bp = torch.randn(C, requires_grad=True)
        table = torch.randn(169, heads, requires_grad=True)
        yield (f"shifted_window_attention {what} ({B},{H},{H},{C}) shift {shift}",
               lambda: shifted_window_attention_ref(x, wq, wp, _dense_bias(table, heads), [7, 7], heads,
                                                    [shift, shift], qkv_bias=bq, proj_bias=bp),
               lambda: vitfast.shifted_window_attention(x, wq, wp, table, [7, 7], heads, [shift, shift], qkv_bias=bq,
                                                        proj_bias=bp), (x, wq, bq, wp, bp, table))


def rel_pos_attention_cases():
    for what, B, n in [("sam_b global b1", 1, 64), ("sam_b windowed b1", 25, 14)]:
        q, k, v = (torch.randn(B, 12, n * n, 64, requires_grad=True) for _ in range(3))
        rel_h, rel_w = (torch.randn(B, 12, n * n, n, requires_grad=True) for _ in range(2))
        # the dense bias built per call, as transformers' SamVisionSdpaAttention and timm's samvit pass it
        yield (f"rel_pos_attention {what} ({B},12,{n}x{n},64)",
               lambda: F.scaled_dot_product_attention(q, k, v, (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)),
               lambda: vitfast.rel_pos_attention(q, k, v, rel_h, rel_w), (q, k, v, rel_h, rel_w))


def patch_embed_cases():
    # (a model's image does not require grad, and then neither side forms its gradient; one that does, as in
    # adversarial training, trains at the same shapes with it; into frozen weights, as saliency maps and adversarial
    # attacks, only the image's gradient is formed)
    for (what, B, E, p, norm), (image_grad, weight_grad) in itertools.product(
            [("vit_b b1", 1, 768, 16, False), ("vit_b b2", 2, 768, 16, False), ("vit_b b8", 8, 768, 16, False),
             ("deit_s b2", 2, 384, 16, False), ("deit_s b8", 8, 384, 16, False), ("swin b1", 1, 96, 4, True),
             ("swin b2", 2, 96, 4, True), ("swin b8", 8, 96, 4, True)], ((False, True), (True, True), (True, False))):
        img = torch.randn(B, 3, 224, 224, requires_grad=image_grad)
        w = (torch.randn(E, 3, p, p) * 0.05).requires_grad_(weight_grad)
        b = torch.randn(E, requires_grad=weight_grad)
        nw = torch.randn(E, requires_grad=weight_grad) if norm else None
        nb = torch.randn(E, requires_grad=weight_grad) if norm else None

        def aten(img=img, w=w, b=b, p=p, nw=nw, nb=nb, E=E):
            z = F.conv2d(img, w, b, stride=p).flatten(2).transpose(1, 2)
            return F.layer_norm(z, (E,), nw, nb, 1e-5) if nw is not None else z

        yield (f"patch_embed {what} (E={E}, p={p}{', norm' if norm else ''}, image {'with' if image_grad else 'without'}"
               f" grad{'' if weight_grad else ', weights frozen'})", aten,
               lambda img=img, w=w, b=b, p=p, nw=nw, nb=nb: vitfast.patch_embed(img, w, b, p, norm_weight=nw,
                                                                                norm_bias=nb),
               tuple(t for t in (img, w, b, nw, nb) if t is not None and t.requires_grad))


def linear_gelu_cases():
    for what, M, K, N in [("vit_b b1", 197, 768, 3072), ("vit_b b8", 8 * 197, 768, 3072),
                          ("deit_s b8", 8 * 197, 384, 1536), ("clip_b32 b1", 50, 768, 3072),
                          ("clip_b32 b8", 400, 768, 3072), ("swin s1 b1", 3136, 96, 384),
                          ("swin s1 b8", 8 * 3136, 96, 384), ("swin s2 b1", 784, 192, 768),
                          ("swin s3 b1", 196, 384, 1536), ("swin s3 b8", 8 * 196, 384, 1536),
                          ("swin s4 b1", 49, 768, 3072)]:
        x = torch.randn(M, K, requires_grad=True)
        w = torch.nn.Parameter(torch.randn(N, K) * K ** -0.5)  # (Parameters, as in a model: oneDNN prepacks them)
        b = torch.nn.Parameter(torch.randn(N))
        yield (f"linear_gelu {what} ({M}x{K}x{N})", lambda: F.gelu(vitfast.linear(x, w, b)),
               lambda: vitfast.linear_gelu(x, w, b), (x, w, b))


def linear_cases():
    # (what, rows, in, out): qkv, proj and fc2 of each model (fc1 is linear_gelu's)
    for what, M, K, N in [("vit_b b1 qkv", 197, 768, 2304), ("vit_b b1 proj", 197, 768, 768),
                          ("vit_b b1 fc2", 197, 3072, 768), ("vit_b b8 qkv", 8 * 197, 768, 2304),
                          ("vit_b b8 fc2", 8 * 197, 3072, 768), ("deit_s b8 qkv", 8 * 197, 384, 1152),
                          ("deit_s b8 fc2", 8 * 197, 1536, 384), ("clip_b32 b1 qkv", 50, 768, 768),
                          ("clip_b32 b8 fc2", 400, 3072, 768), ("swin s1 b1 qkv", 3136, 96, 288),
                          ("swin s1 b8 qkv", 8 * 3136, 96, 288), ("swin s1 b8 fc2", 8 * 3136, 384, 96),
                          ("swin s3 b1 qkv", 196, 384, 1152), ("swin s4 b8 fc2", 8 * 49, 3072, 768)]:
        x = torch.randn(M, K, requires_grad=True)
        w = torch.nn.Parameter(torch.randn(N, K) * K ** -0.5)
        b = torch.nn.Parameter(torch.randn(N))
        yield (f"linear {what} ({M}x{K}x{N})", lambda: F.linear(x, w, b), lambda: vitfast.linear(x, w, b), (x, w, b))


def mlp_rows_cases():
    from vitfast.integrations import choice
    from vitfast.integrations import patch as vp

    def body(mlp, x):
        return mlp[2](vp.mlp_fc1(x, mlp[0], mlp[1]))

    def chunked(mlp, x):
        rule = vp.mlp_chunk_rows
        vp.mlp_chunk_rows = lambda x, mlp, hidden: choice.MLP_ROWS_CHUNK_BYTES // (hidden * 4)
        try:
            return vp.mlp_rows(mlp, x, mlp[0], body)
        finally:
            vp.mlp_chunk_rows = rule

    # (what, rows, features): the hidden layer has 4x the features
    for what, M, C in [("swin s1 b2", 2 * 3136, 96), ("swin s1 b4", 4 * 3136, 96), ("swin s1 b8", 8 * 3136, 96),
                       ("swin s1 b16", 16 * 3136, 96), ("swin s2 b8", 8 * 784, 192), ("swin s2 b16", 16 * 784, 192),
                       ("swin s3 b32", 32 * 196, 384), ("vit_b b16", 16 * 197, 768)]:
        mlp = torch.nn.Sequential(torch.nn.Linear(C, 4 * C), torch.nn.GELU(), torch.nn.Linear(4 * C, C)).eval()
        vitfast.patch_model(mlp)
        x = torch.randn(M, C)
        yield (f"mlp rows {what} ({M}x{C}x{4 * C})", lambda mlp=mlp, x=x: body(mlp, x),
               lambda mlp=mlp, x=x: chunked(mlp, x), None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],  # (its first line stopped mid-sentence)
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-k", default="", help="only the cases whose name contains this")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        ap.error(f"--reps and --threads must be at least 1, got {args.reps} and {args.threads}")
    try:  # (a forced backend made the "vitfast" column time that backend, e.g. the torch reference, unsaid)
        forced = vitfast.backend.forced_backend()
    except ValueError as e:
        ap.error(str(e))
    if forced is not None:
        ap.error(f"vitfast's backend is forced to {forced!r} (VITFAST_BACKEND, use_backend or set_backend): the "
                 f"table compares vitfast's own choice with ATen; run without it")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = vitfast.info()
    commit = f" (commit {env['commit']})" if env["commit"] else ""
    print(f"vitfast {env['vitfast']}{commit} on {env['cpu']}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, medians of {args.reps} interleaved")
    print("| case | mode | ATen ms | vitfast ms | ATen / vitfast |")
    print("|---|---|---|---|---|")
    names, matched = [], False
    for cases in (layer_norm_cases, attention_cases, window_attention_cases, rel_pos_attention_cases,
                  patch_embed_cases, linear_gelu_cases, linear_cases, mlp_rows_cases):
        for name, aten, fused, leaves in cases():
            names.append(name)
            if args.k not in name:
                continue
            matched = True
            modes = [("inference", _infer)] + ([("training", lambda f: _train(f, *leaves))] if leaves else [])
            for mode, wrap in modes:
                ta, tv = map(statistics.median, interleaved([wrap(aten), wrap(fused)], args.reps))
                print(f"| {name} | {mode} | {ta * 1e3:.3f} | {tv * 1e3:.3f} | {ta / tv:.2f} |", flush=True)
    if not matched:  # (a typo printed an empty table, exit status 0)
        ap.error(f"-k {args.k!r} is in no case's name; the names: {'; '.join(names)}")


if __name__ == "__main__":
    main()
