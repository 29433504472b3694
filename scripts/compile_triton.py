"""Compiles every Triton kernel of vitfast for an NVIDIA H100 (sm_90) on a machine without a GPU.

Each op runs forward and backward through its public function with the triton backend forced, under
`vitfast.triton.common.compile_only`: the launches compile (every configuration of an autotuned kernel) and
nothing runs. The cases cover the shapes of the models in scope and every feature that selects another kernel
specialization: dtypes bf16/fp16/fp32, head dims 16..256 with non powers of two, masks, bias with gradient,
causal, dropout, cross-attention, strided (flash-attn layout) inputs, Swin windows 7 and 12 with shift, padding
and V2 cosine attention, patch embedding with and without LayerNorm and prefix tokens, odd patch merging, SAM's
decomposed relative-position attention (windowed and global, key grids 1 to 128 wide).

Writes one line per compiled specialization (registers, spill bytes, shared memory, compile seconds) and exits 1
when one fails to compile or needs more shared memory than the GPU has, unless it is a configuration of an
autotuned launch in which another configuration fits (Triton's autotuner skips configurations that run out of
resources). Register spills are listed, not failed: they cost speed, which only a GPU can measure.

    python scripts/compile_triton.py [--quick] [--markdown FILE]

--quick compiles bf16 only, with fewer head dims (CI).
"""
import argparse
import os
import platform
import sys
import time
from collections import Counter

import torch
import triton

import vitfast
from vitfast.triton.common import H100, compile_only


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
                yield f"layer_norm C={C} residual={residual} {dt}", _run(vitfast.layer_norm, x, (C,), w, b, 1e-6, r)


def attention_cases(dtypes, head_dims):
    def case(B, H, Nq, Nk, D, dt, mask=None, causal=False, dropout=0.0, flash_layout=False):
        if flash_layout:  # (B, N, H, D) views of one packed qkv projection
            qkv = _leaf(B, Nq, 3, H, D, dtype=dt)
            return _run(vitfast.flash_attn_func, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout, causal=causal)
        q, k, v = _leaf(B, H, Nq, D, dtype=dt), _leaf(B, H, Nk, D, dtype=dt), _leaf(B, H, Nk, D, dtype=dt)
        return _run(vitfast.attention, q, k, v, mask, is_causal=causal, dropout_p=dropout)

    for dt in dtypes:
        for D in head_dims:
            yield f"attention ViT N=197 D={D} {dt}", case(2, 2, 197, 197, D, dt)
        yield f"attention DETR encoder N=850 key padding D=32 {dt}", case(
            2, 8, 850, 850, 32, dt, mask=torch.rand(2, 1, 1, 850) > 0.1)
        yield f"attention DETR decoder 100x850 key padding D=32 {dt}", case(
            2, 8, 100, 850, 32, dt, mask=torch.rand(2, 1, 1, 850) > 0.1)
        yield f"attention bias with grad (1, H, N, N) D=64 {dt}", case(
            2, 2, 197, 197, 64, dt, mask=_leaf(1, 2, 197, 197, dtype=dt))
        yield f"attention CLIP text N=77 causal D=64 {dt}", case(2, 8, 77, 77, 64, dt, causal=True)
        yield f"attention dropout 0.1 D=64 {dt}", case(2, 2, 197, 197, 64, dt, dropout=0.1)
        yield f"attention flash layout (strided qkv) D=64 {dt}", case(2, 2, 197, 197, 64, dt, flash_layout=True)


def window_attention_cases(dtypes):
    for dt in dtypes:
        for H, heads, window, shift in ((56, 3, 7, 3), (14, 12, 7, 0), (15, 4, 7, 3), (24, 4, 12, 6)):
            qkv = _leaf(2, H, H, 3, heads, 32, dtype=dt)
            table = _leaf((2 * window - 1) ** 2, heads, dtype=torch.float32)
            pad = _leaf(3, heads, 32, dtype=dt)
            yield f"window_attention {H}x{H} heads={heads} window={window} shift={shift} {dt}", _run(
                vitfast.window_attention, qkv, table, window, shift, qkv_pad=pad)
        x = _leaf(2, 56, 56, 96, dtype=dt)
        weights = [_leaf(288, 96, dtype=dt), _leaf(96, 96, dtype=dt), _leaf(169, 3, dtype=dt), _leaf(288, dtype=dt)]
        logit_scale = _leaf(3, 1, 1, dtype=torch.float32)
        yield f"shifted_window_attention Swin-V2 cosine + dropout 56x56 {dt}", _run(
            vitfast.shifted_window_attention, x, *weights[:3], [7, 7], 3, [3, 3], 0.1, qkv_bias=weights[3],
            logit_scale=logit_scale)


def patch_embed_cases(dtypes):
    for dt in dtypes:
        for name, (B, C, S, E, p) in {"ViT-B/16": (2, 3, 224, 768, 16), "ViT-L/14 336": (2, 3, 336, 1024, 14)}.items():
            images, w, b = _leaf(B, C, S, S, dtype=dt), _leaf(E, C, p, p, dtype=dt), _leaf(E, dtype=dt)
            pos, cls = _leaf(1, (S // p) ** 2 + 1, E, dtype=dt), _leaf(1, 1, E, dtype=dt)
            yield f"patch_embed {name} class token + pos {dt}", _run(
                vitfast.patch_embed, images, w, b, p, pos_embed=pos, num_prefix_tokens=1, prefix_tokens=cls)
        images, w, b = _leaf(2, 3, 224, 224, dtype=dt), _leaf(96, 3, 4, 4, dtype=dt), _leaf(96, dtype=dt)
        nw, nb = _leaf(96, dtype=dt), _leaf(96, dtype=dt)
        yield f"patch_embed Swin-T + LayerNorm {dt}", _run(vitfast.patch_embed, images, w, b, 4, norm_weight=nw,
                                                            norm_bias=nb)


def patch_merging_cases(dtypes):
    for dt in dtypes:
        for H, C in ((56, 96), (28, 192), (7, 384)):
            x, nw, nb, r = _leaf(2, H, H, C, dtype=dt), _leaf(4 * C, dtype=dt), _leaf(4 * C, dtype=dt), \
                _leaf(2 * C, 4 * C, dtype=dt)
            yield f"patch_merging {H}x{H}x{C} {dt}", _run(vitfast.patch_merging, x, nw, nb, r)


def rel_pos_attention_cases(dtypes, head_dims):
    def case(B, H, q_hw, k_hw, D, dt, dropout=0.0):
        Nq, Nk = q_hw[0] * q_hw[1], k_hw[0] * k_hw[1]
        q, k, v = _leaf(B, H, Nq, D, dtype=dt), _leaf(B, H, Nk, D, dtype=dt), _leaf(B, H, Nk, D, dtype=dt)
        rel_h, rel_w = _leaf(B, H, Nq, k_hw[0], dtype=dt), _leaf(B, H, Nq, k_hw[1], dtype=dt)
        return _run(vitfast.rel_pos_attention, q, k, v, rel_h, rel_w, dropout_p=dropout)

    for dt in dtypes:
        for D in head_dims:
            yield f"rel_pos_attention SAM global 64x64 D={D} {dt}", case(1, 2, (64, 64), (64, 64), D, dt)
        yield f"rel_pos_attention SAM window 14x14 D=64 {dt}", case(4, 2, (14, 14), (14, 14), 64, dt)
        yield f"rel_pos_attention SAM window 14x14 D=80 {dt}", case(4, 2, (14, 14), (14, 14), 80, dt)
        yield f"rel_pos_attention kw=128 (2048 px) D=64 {dt}", case(1, 2, (8, 128), (8, 128), 64, dt)
        yield f"rel_pos_attention kw=1 D=64 {dt}", case(1, 2, (9, 1), (33, 1), 64, dt)
        yield f"rel_pos_attention dropout 0.1 D=64 {dt}", case(1, 2, (14, 14), (14, 14), 64, dt, dropout=0.1)


def cases(quick: bool):
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    head_dims = (32, 64, 80, 256) if quick else (16, 32, 40, 64, 72, 80, 96, 112, 128, 160, 256)
    yield from layer_norm_cases(dtypes)
    yield from attention_cases(dtypes, head_dims)
    yield from window_attention_cases(dtypes)
    yield from patch_embed_cases(dtypes)
    yield from patch_merging_cases(dtypes)
    yield from rel_pos_attention_cases(dtypes, head_dims)


_CAVEAT = ("Compile-time figures only: registers and spill bytes (stores + loads, per thread) from the ptxas that "
           "ships with this Triton, shared memory from Triton; no kernel ran and nothing here is a timing. Another "
           "Triton version (the GPU machine's) compiles its own code. Some specializations come out at 32 registers "
           "with tens of KB of spills, which looks like a register-allocation choice of this ptxas rather than the "
           "kernel's need: recheck those on the GPU before tuning from them.")


def _outcome(r) -> str:
    if r.error or (r.problems and not r.autotuner_skips):
        return "failed"
    if r.autotuner_skips:
        return "skipped by the autotuner"
    return "spills" if r.spill_bytes else "ok"


def _config(c) -> str:
    return " ".join(f"{k}={v}" for k, v in c.config.items() if k.startswith("BLOCK") or k.startswith("num_"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16 only, fewer head dims (CI)")
    parser.add_argument("--markdown", help="also write the table of compiled kernels to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start, failures, lines = time.perf_counter(), [], []
    with compile_only(H100) as records, vitfast.use_backend("triton"):
        for name, run in cases(args.quick):
            before = len(records)
            try:
                run()
            except Exception as e:  # noqa: BLE001 - a launcher error is a failure of this case, the run goes on
                failures.append(f"{name}: {type(e).__name__}: {e}")
            for r in records[before:]:
                outcome = _outcome(r)
                detail = r.error or "; ".join(r.problems)
                status = f"{outcome}: {detail}" if detail else outcome
                lines.append((name, r.kernel, _config(r), r.registers, r.spill_bytes, r.shared_bytes, r.seconds,
                              status))
                if outcome == "failed":
                    failures.append(f"{name}: {r.kernel} {_config(r)}: {detail}")
            print(f"{name}: {len(records) - before} kernels", flush=True)
    header = ("case", "kernel", "config", "registers", "spill bytes", "shared bytes", "compile s", "status")
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + " |" for row in lines]
    counts = Counter(row[-1].split(":")[0] for row in lines)
    summary = (f"{len(lines)} kernel specializations compiled for {H100.name} with triton {triton.__version__}, "
               f"torch {torch.__version__}, on {platform.processor() or platform.machine()} ({os.cpu_count()} "
               f"cores, no GPU), {time.strftime('%Y-%m-%d')}, in {time.perf_counter() - start:.0f} s: {dict(counts)}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# Triton kernels compiled for {H100.name}, no GPU\n\n{summary}\n\n{_CAVEAT}\n\n"
                    + "\n".join(table) + "\n")
    spilling = sorted({(row[1], row[2], row[4]) for row in lines if row[4]})
    for kernel, config, spill in spilling:
        print(f"spills {spill} bytes: {kernel} {config}")
    print(summary)
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
