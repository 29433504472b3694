"""Compiles every Triton kernel of vitfast for an NVIDIA H100 (sm_90) on a machine without a GPU.

Each op runs forward and backward through its public function with the triton backend forced, under
`vitfast.triton.common.compile_only`: the launches compile (every configuration of an autotuned kernel) and
nothing runs. The cases cover the shapes of the models in scope and every feature that selects another kernel
specialization: dtypes bf16/fp16/fp32, head dims 16..256 with non powers of two, masks, bias with gradient,
causal, dropout, cross-attention, strided (flash-attn layout) inputs, Swin windows 7 and 12 with shift, padding
and V2 cosine attention, patch embedding with and without LayerNorm and prefix tokens, odd patch merging, SAM's
decomposed relative-position attention (windowed and global, key grids 1 to 128 wide); and the edges of what each
op admits (`edge_cases`: largest head dim, largest fused-norm and LayerNorm widths, in bf16 and fp32, and
batch * heads past 65535).

Writes one line per compiled specialization (registers, spill bytes, shared memory, compile seconds) and exits 1
when
- a specialization fails to compile, or needs more shared memory than the GPU has, unless it is a configuration of
  an autotuned launch that the autotuner skips because another configuration fits;
- a launch's grid exceeds CUDA's limits (x < 2**31, y and z < 65536), or a kernel is launched without
  vitfast.triton.common.launch (the device guard);
- at a headline config (the shapes of the headline benchmarks) a kernel that spills registers can run: a fixed
  configuration that spills, or a spilling autotuner configuration that is not pruned (`usable_configs`).
Elsewhere register spills are listed, not failed: they cost speed, which only a GPU can measure.

    python scripts/compile_triton.py [--quick] [--cases TEXT] [--markdown FILE]

--quick compiles bf16 only, with fewer head dims and shapes, and every edge case (CI); --cases only the cases whose name
contains TEXT.
"""
import argparse
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import triton

import vitfast
from vitfast.triton.common import H100, compile_only


@dataclass
class Case:
    name: str
    run: Callable[[], None]
    headline: bool = False  # a headline benchmark's config: no spilling kernel may run there


def _run(fn, *args, **kwargs):
    """A case: fn(*args, **kwargs) forward, then backward from every output that requires grad."""
    def run():
        out = fn(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return run


def _leaf(*shape, dtype):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def layer_norm_cases(dtypes):
    for dt in dtypes:
        for C in (96, 384, 768, 1024, 1280):  # Swin-T stage 1, patch merging input, ViT-B, ViT-L, ViT-H
            for residual in (False, True):
                x, w, b = _leaf(2, 197, C, dtype=dt), _leaf(C, dtype=dt), _leaf(C, dtype=dt)
                r = _leaf(2, 197, C, dtype=dt) if residual else None
                yield Case(f"layer_norm C={C} residual={residual} {dt}",
                           _run(vitfast.layer_norm, x, (C,), w, b, 1e-6, r), headline=C == 768 and not residual)


def _attention(B, H, Nq, Nk, D, dt, mask=None, causal=False, dropout=0.0, flash_layout=False, make=_leaf):
    if flash_layout:  # (B, N, H, D) views of one packed qkv projection
        qkv = make(B, Nq, 3, H, D, dtype=dt)
        return _run(vitfast.flash_attn_func, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout, causal=causal)
    q, k, v = make(B, H, Nq, D, dtype=dt), make(B, H, Nk, D, dtype=dt), make(B, H, Nk, D, dtype=dt)
    return _run(vitfast.attention, q, k, v, mask, is_causal=causal, dropout_p=dropout)


def attention_cases(dtypes, head_dims):
    for dt in dtypes:
        for D in head_dims:
            yield Case(f"attention ViT N=197 D={D} {dt}", _attention(2, 2, 197, 197, D, dt), headline=D == 64)
        yield Case(f"attention DETR encoder N=850 key padding D=32 {dt}",
                   _attention(2, 8, 850, 850, 32, dt, mask=torch.rand(2, 1, 1, 850) > 0.1), headline=True)
        yield Case(f"attention DETR decoder 100x850 key padding D=32 {dt}",
                   _attention(2, 8, 100, 850, 32, dt, mask=torch.rand(2, 1, 1, 850) > 0.1))
        yield Case(f"attention bias with grad (1, H, N, N) D=64 {dt}",
                   _attention(2, 2, 197, 197, 64, dt, mask=_leaf(1, 2, 197, 197, dtype=dt)))
        yield Case(f"attention CLIP text N=77 causal D=64 {dt}", _attention(2, 8, 77, 77, 64, dt, causal=True))
        yield Case(f"attention dropout 0.1 D=64 {dt}", _attention(2, 2, 197, 197, 64, dt, dropout=0.1))
        yield Case(f"attention flash layout (strided qkv) D=64 {dt}",
                   _attention(2, 2, 197, 197, 64, dt, flash_layout=True))


def _window_attention(B, H, heads, D, window, shift, dt, make=_leaf):
    qkv = make(B, H, H, 3, heads, D, dtype=dt)
    table = make((2 * window - 1) ** 2, heads, dtype=torch.float32)
    pad = make(3, heads, D, dtype=dt)
    return _run(vitfast.window_attention, qkv, table, window, shift, qkv_pad=pad)


def window_attention_cases(dtypes):
    for dt in dtypes:
        for H, heads, window, shift in ((56, 3, 7, 3), (14, 12, 7, 0), (15, 4, 7, 3), (24, 4, 12, 6)):
            yield Case(f"window_attention {H}x{H} heads={heads} window={window} shift={shift} {dt}",
                       _window_attention(2, H, heads, 32, window, shift, dt), headline=(H, window) == (56, 7))
        x = _leaf(2, 56, 56, 96, dtype=dt)
        weights = [_leaf(288, 96, dtype=dt), _leaf(96, 96, dtype=dt), _leaf(169, 3, dtype=dt), _leaf(288, dtype=dt)]
        logit_scale = _leaf(3, 1, 1, dtype=torch.float32)
        yield Case(f"shifted_window_attention Swin-V2 cosine + dropout 56x56 {dt}", _run(
            vitfast.shifted_window_attention, x, *weights[:3], [7, 7], 3, [3, 3], 0.1, qkv_bias=weights[3],
            logit_scale=logit_scale))


def _patch_embed(B, S, E, p, dt, norm=False, prefix=0, make=_leaf):
    images, w, b = make(B, 3, S, S, dtype=dt), make(E, 3, p, p, dtype=dt), make(E, dtype=dt)
    kwargs = dict(norm_weight=make(E, dtype=dt), norm_bias=make(E, dtype=dt)) if norm else {}
    if prefix:
        kwargs.update(pos_embed=make(1, (S // p) ** 2 + prefix, E, dtype=dt), num_prefix_tokens=prefix,
                      prefix_tokens=make(1, prefix, E, dtype=dt))
    return _run(vitfast.patch_embed, images, w, b, p, **kwargs)


def patch_embed_cases(dtypes, quick=False):
    for dt in dtypes:
        yield Case(f"patch_embed ViT-B/16 class token + pos {dt}", _patch_embed(2, 224, 768, 16, dt, prefix=1),
                   headline=True)
        if not quick:
            yield Case(f"patch_embed ViT-L/14 336 class token + pos {dt}",
                       _patch_embed(2, 336, 1024, 14, dt, prefix=1))
        yield Case(f"patch_embed Swin-T + LayerNorm {dt}", _patch_embed(2, 224, 96, 4, dt, norm=True))


def patch_merging_cases(dtypes, quick=False):
    for dt in dtypes:
        for H, C in ((56, 96),) if quick else ((56, 96), (28, 192), (7, 384)):
            x, nw, nb, r = _leaf(2, H, H, C, dtype=dt), _leaf(4 * C, dtype=dt), _leaf(4 * C, dtype=dt), \
                _leaf(2 * C, 4 * C, dtype=dt)
            yield Case(f"patch_merging {H}x{H}x{C} {dt}", _run(vitfast.patch_merging, x, nw, nb, r))


def _empty(*shape, dtype):
    """A large input that nothing reads (compile-only): no memory is touched."""
    return torch.empty(*shape, dtype=dtype)


def edge_cases():
    """The edges of what each op admits, bf16 and fp32: the largest head dims and fused-norm width, and grids with
    batch * heads past 65535 (Swin-B stage 4, 32 heads, from batch 2048; here with tiny windows)."""
    from vitfast.ops.attention import MAX_HEAD_DIM
    from vitfast.triton.layer_norm import MAX_N
    from vitfast.triton.patch_embed import MAX_NORM_E
    for dt in (torch.bfloat16, torch.float32):
        x, w, b = _leaf(4, MAX_N, dtype=dt), _leaf(MAX_N, dtype=dt), _leaf(MAX_N, dtype=dt)
        yield Case(f"edge: layer_norm C={MAX_N} + residual {dt}",
                   _run(vitfast.layer_norm, x, (MAX_N,), w, b, 1e-6, _leaf(4, MAX_N, dtype=dt)))
        yield Case(f"edge: attention D={MAX_HEAD_DIM} {dt}", _attention(1, 2, 197, 197, MAX_HEAD_DIM, dt))
        yield Case(f"edge: window_attention D=256 {dt}", _window_attention(1, 14, 2, 256, 7, 3, dt))
        images, wt, bt = _empty(2, 3, 224, 224, dtype=dt), _empty(MAX_NORM_E, 3, 4, 4, dtype=dt), \
            _empty(MAX_NORM_E, dtype=dt)
        yield Case(f"edge: patch_embed E={MAX_NORM_E} + LayerNorm, forward {dt}",
                   lambda: vitfast.patch_embed(images, wt, bt, 4, norm_weight=bt, norm_bias=bt))
    yield Case("edge: attention B*H = 66560 > 65535",
               _attention(520, 128, 16, 16, 64, torch.bfloat16, make=_empty_leaf))
    yield Case("edge: rel_pos_attention D=256 float32", _rel_pos_attention(1, 2, (14, 14), (14, 14), 256, torch.float32))
    # the widest key rows at the largest tiles (fp32 at D=128 too, 2026-12-01: 0 failures, but 8 minutes to compile)
    yield Case("edge: rel_pos_attention kw=128 D=256 bfloat16",
               _rel_pos_attention(1, 2, (2, 128), (2, 128), 256, torch.bfloat16))
    yield Case("edge: rel_pos_attention B*H = 66560 > 65535",
               _rel_pos_attention(520, 128, (4, 4), (4, 4), 64, torch.bfloat16, make=_empty_leaf))
    yield Case("edge: window_attention B*heads = 65536 > 65535",
               _window_attention(64, 2, 1024, 16, 2, 0, torch.bfloat16, make=_empty_leaf))


def _empty_leaf(*shape, dtype):
    return _empty(*shape, dtype=dtype).requires_grad_()


def _rel_pos_attention(B, H, q_hw, k_hw, D, dt, dropout=0.0, make=None):
    make = make or _leaf
    Nq, Nk = q_hw[0] * q_hw[1], k_hw[0] * k_hw[1]
    q, k, v = make(B, H, Nq, D, dtype=dt), make(B, H, Nk, D, dtype=dt), make(B, H, Nk, D, dtype=dt)
    rel_h, rel_w = make(B, H, Nq, k_hw[0], dtype=dt), make(B, H, Nq, k_hw[1], dtype=dt)
    return _run(vitfast.rel_pos_attention, q, k, v, rel_h, rel_w, dropout_p=dropout)


def rel_pos_attention_cases(dtypes, head_dims):
    case = _rel_pos_attention
    for dt in dtypes:
        for D in head_dims:
            yield Case(f"rel_pos_attention SAM global 64x64 D={D} {dt}", case(1, 2, (64, 64), (64, 64), D, dt))
        yield Case(f"rel_pos_attention SAM window 14x14 D=64 {dt}", case(4, 2, (14, 14), (14, 14), 64, dt))
        yield Case(f"rel_pos_attention SAM window 14x14 D=80 {dt}", case(4, 2, (14, 14), (14, 14), 80, dt))
        yield Case(f"rel_pos_attention kw=128 (2048 px) D=64 {dt}", case(1, 2, (8, 128), (8, 128), 64, dt))
        yield Case(f"rel_pos_attention kw=1 D=64 {dt}", case(1, 2, (9, 1), (33, 1), 64, dt))
        yield Case(f"rel_pos_attention dropout 0.1 D=64 {dt}",
                   case(1, 2, (14, 14), (14, 14), 64, dt, dropout=0.1))


def linear_gelu_cases(dtypes):
    for dt in dtypes:
        for what, M, K, N in (("ViT-B fc1", 197, 768, 3072), ("Swin-T stage 1 fc1", 3136, 96, 384)):
            for approximate in ("none", "tanh"):
                x, w, b = _leaf(M, K, dtype=dt), _leaf(N, K, dtype=dt), _leaf(N, dtype=dt)
                yield Case(f"linear_gelu {what} approximate={approximate} {dt}",
                           _run(vitfast.linear_gelu, x, w, b, approximate), headline=approximate == "none")


def cases(quick: bool):
    """Every Case: the model shapes and features (with --quick bf16 only, head dims 64 and 80, one Swin stage's patch
    merging, no ViT-L patch embedding), then the edge cases (always: head dim 256 among them)."""
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    head_dims = (64, 80) if quick else (16, 32, 40, 64, 72, 80, 96, 112, 128, 160, 256)
    yield from layer_norm_cases(dtypes)
    yield from attention_cases(dtypes, head_dims)
    yield from window_attention_cases(dtypes)
    yield from patch_embed_cases(dtypes, quick)
    yield from patch_merging_cases(dtypes, quick)
    yield from rel_pos_attention_cases(dtypes, head_dims)
    yield from linear_gelu_cases(dtypes)
    yield from edge_cases()


_CAVEAT = ("Compile-time figures only: registers and spill bytes (stores + loads, per thread) from the ptxas that "
           "ships with this Triton, shared memory from Triton; no kernel ran and nothing here is a timing. Another "
           "Triton version (the GPU machine's) compiles its own code. Some specializations come out at 32 registers "
           "with tens of KB of spills, which looks like a register-allocation choice of this ptxas rather than the "
           "kernel's need: recheck those on the GPU before tuning from them.")


def _outcome(r, skipped: bool) -> str:
    if r.error or (r.problems and not skipped):
        return "failed"
    if skipped:
        return "skipped by the autotuner"
    return "spills" if r.spill_bytes else "ok"


def _config(c) -> str:
    return " ".join(f"{k}={v}" for k, v in c.config.items() if k.startswith("BLOCK") or k.startswith("num_"))


def _check_case(case, records, first_record, first_launch, lines, failures) -> None:
    """Adds the case's new specializations to `lines` and every failure of its launches to `failures`."""
    launches = records.launches[first_launch:]
    run = {id(launch.compilation) for launch in launches if not launch.autotuner_skips}
    for r in records[first_record:]:
        outcome = _outcome(r, skipped=id(r) not in run)
        detail = r.error or "; ".join(r.problems)
        lines.append((case.name, r.kernel, _config(r), r.registers, r.spill_bytes, r.shared_bytes, r.seconds,
                      f"{outcome}: {detail}" if detail else outcome))
        if outcome == "failed":
            failures.append(f"{case.name}: {r.kernel} {_config(r)}: {detail}")
    flagged = set()
    for launch in launches:
        r = launch.compilation
        for problem in launch.problems:
            failures.append(f"{case.name}: {r.kernel} {_config(r)}: {problem}")
        if case.headline and r.spill_bytes and not launch.autotuner_skips and id(r) not in flagged:
            flagged.add(id(r))
            failures.append(f"{case.name}: {r.kernel} {_config(r)}: spills {r.spill_bytes} bytes at a headline "
                            f"config and the launch can run it")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16 only, fewer head dims, every edge case (CI)")
    parser.add_argument("--cases", default="", help="only the cases whose name contains this text")
    parser.add_argument("--markdown", help="also write the table of compiled kernels to this file")
    args = parser.parse_args(argv)
    if args.markdown is not None:  # (found after compiling, with a traceback that lost the summary and failures)
        existed = os.path.exists(args.markdown)
        try:
            open(args.markdown, "a").close()
            if not existed:
                os.remove(args.markdown)
        except OSError as e:
            parser.error(f"--markdown {args.markdown}: {e}")
    selected = [case for case in cases(args.quick) if args.cases in case.name]
    if not selected:  # (a typo compiled nothing and passed)
        parser.error(f"--cases {args.cases!r} is in no case's name; the names: "
                     + "; ".join(case.name for case in cases(args.quick)))
    torch.manual_seed(0)
    start, failures, lines = time.perf_counter(), [], []
    with compile_only(H100) as records, vitfast.use_backend("triton"):
        for case in selected:
            case_start = time.perf_counter()
            first_record, first_launch = len(records), len(records.launches)
            try:
                case.run()
            except Exception as e:  # noqa: BLE001 - a launcher error is a failure of this case, the run goes on
                failures.append(f"{case.name}: {type(e).__name__}: {e}")
            _check_case(case, records, first_record, first_launch, lines, failures)
            print(f"{case.name}: {len(records.launches) - first_launch} launches, "
                  f"{len(records) - first_record} new kernels, {time.perf_counter() - case_start:.0f} s", flush=True)
    header = ("case", "kernel", "config", "registers", "spill bytes", "shared bytes", "compile s", "status")
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + " |" for row in lines]
    counts = Counter(row[-1].split(":")[0] for row in lines)
    summary = (f"{len(lines)} kernel specializations compiled for {H100.name} with triton {triton.__version__}, "
               f"torch {torch.__version__}, on {platform.processor() or platform.machine()} ({os.cpu_count()} "
               f"cores, no GPU), {time.strftime('%Y-%m-%d')}, in {time.perf_counter() - start:.0f} s: "
               f"{dict(counts)}; {len(records.launches)} launches checked against CUDA's grid limits; "
               f"{len(failures)} failures")
    spilling = sorted({(row[1], row[2], row[4]) for row in lines if row[4]})
    for kernel, config, spill in spilling:
        print(f"spills {spill} bytes: {kernel} {config}")
    print(summary)
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    if args.markdown is not None:  # (after the summary and the failures: they are printed whatever happens here)
        try:
            with open(args.markdown, "w") as f:
                f.write(f"# Triton kernels compiled for {H100.name}, no GPU\n\n{summary}\n\n{_CAVEAT}\n\n"
                        + "\n".join(table) + "\n")
        except OSError as e:
            print(f"compile_triton.py: error: --markdown {args.markdown}: {e}", file=sys.stderr)
            return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
