"""`python -m vitfast [run|info|check|bench]`: what this machine can run, how right and how fast it is.

run (default): every op at its default shapes on this machine's device, forward and forward+backward, each
    available vitfast backend against the plain PyTorch baseline: max error against a float64 reference
    (output and every gradient), median time (baseline and backends timed in turn, round by round, so that a
    shared machine's drift hits them alike), speedup. On a CPU the shapes are small.
check: the same comparison with one timed repetition (its times are not measurements).
bench: run for the ops named with --op (at least one).
info: the environment only.
--backend (or VITFAST_BACKEND, which names the one backend to measure) keeps the cases that backend implements.
Every command but info exits with status 1 if any backend's error, in the output or any gradient, exceeds twice the
baseline's error for that tensor in the same dtype (plus a few ulps), if, without --backend, the compiled extension
vitfast._C did not load, or if a backend asked for with --backend runs none of the cases (a backend that cannot
take a case's inputs, e.g. onednn, float32 only, in bfloat16, is skipped with a note); with status 2 on bad
arguments (argparse's; a --backend that runs no case on the device at all), a VITFAST_BACKEND that is bad, torch
(the baseline's; nothing of vitfast's to measure) or unlike --backend, or an --out it cannot write, all checked
before measuring (an --out that fails while writing, after measuring, and an output it cannot print, e.g. on a full
disk, also exit with status 2). A closed pipe (`| head`) ends the job quietly, as it does other Unix tools.
"""
import argparse
import importlib.util
import json
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import vitfast
from vitfast import _ext, backend
from vitfast.info import _cpu_model
from vitfast.ops.layer_norm import layer_norm_ref
from vitfast.ops.linear import linear_ref
from vitfast.ops.linear_gelu import linear_gelu_ref
from vitfast.ops.patch_embed import patch_embed_ref
from vitfast.ops.patch_merging import patch_merging_ref
from vitfast.ops.window_attention import window_attention_ref
from vitfast.report import interleaved, markdown_table, plot_speedups


@dataclass
class Case:
    """One op at one shape. make(device, dtype) -> inputs, of which those at `grad` get gradients;
    fn(*inputs) runs vitfast, baseline(*inputs) the PyTorch it is compared with (also the fp64 reference)."""

    op: str
    shape: str
    make: Callable
    grad: Sequence[int]
    fn: Callable
    baseline: Callable
    baseline_name: str = "torch"


def _randn(device, dtype, *shape, scale=1.0):
    return torch.randn(*shape, device=device, dtype=dtype) * scale


def _cases(gpu: bool) -> list:
    B = 64 if gpu else 2
    m = 64 * 197 if gpu else 8 * 197
    img = 224 if gpu else 112
    swin_b = 64 if gpu else 1
    sam_b, sam_n = (8, 64) if gpu else (1, 32)  # SAM-B's global-attention layer at 1024 px (on a CPU, at 512 px)
    return [
        Case("layer_norm", f"({m}, 768)",
             lambda d, t: (_randn(d, t, m, 768), _randn(d, t, 768), _randn(d, t, 768)), (0, 1, 2),
             lambda x, w, b: vitfast.layer_norm(x, 768, w, b, 1e-6),
             lambda x, w, b: layer_norm_ref(x, (768,), w, b, 1e-6), "F.layer_norm"),
        Case("layer_norm+residual", f"({m}, 384)",
             lambda d, t: (_randn(d, t, m, 384), _randn(d, t, m, 384), _randn(d, t, 384), _randn(d, t, 384)),
             (0, 1, 2, 3),
             lambda x, r, w, b: vitfast.layer_norm(x, 384, w, b, 1e-6, residual=r)[0],
             lambda x, r, w, b: layer_norm_ref(x, (384,), w, b, 1e-6, residual=r)[0], "x + r, F.layer_norm"),
        Case("attention ViT-B/16", f"B={B} H=12 N=197 D=64",
             lambda d, t: tuple(_randn(d, t, B, 12, 197, 64) for _ in range(3)), (0, 1, 2),
             lambda q, k, v: vitfast.attention(q, k, v), F.scaled_dot_product_attention, "SDPA"),
        Case("attention CLIP text causal", f"B={B} H=8 N=77 D=64",
             lambda d, t: tuple(_randn(d, t, B, 8, 77, 64) for _ in range(3)), (0, 1, 2),
             lambda q, k, v: vitfast.attention(q, k, v, is_causal=True),
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), "SDPA"),
        Case("attention + rel. bias", f"B={B} H=12 N=197 D=64",
             lambda d, t: tuple(_randn(d, t, B, 12, 197, 64) for _ in range(3)) + (_randn(d, t, 1, 12, 197, 197),),
             (0, 1, 2, 3),
             lambda q, k, v, b: vitfast.attention(q, k, v, b),
             lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, b), "SDPA (float mask)"),
        Case("window attention Swin-T s1", f"B={swin_b} 56x56 3 heads w7 s3",
             lambda d, t: (_randn(d, t, swin_b, 56, 56, 3, 3, 32), _randn(d, t, 169, 3)), (0, 1),
             lambda qkv, table: vitfast.window_attention(qkv, table, 7, 3),
             lambda qkv, table: window_attention_ref(qkv, table, 7, 3), "eager (roll, partition)"),
        Case("rel_pos_attention SAM-B global", f"B={sam_b} H=12 {sam_n}x{sam_n} D=64",
             lambda d, t: tuple(_randn(d, t, sam_b, 12, sam_n**2, 64) for _ in range(3))
             + tuple(_randn(d, t, sam_b, 12, sam_n**2, sam_n) for _ in range(2)), (0, 1, 2, 3, 4),
             vitfast.rel_pos_attention,
             lambda q, k, v, rh, rw: F.scaled_dot_product_attention(q, k, v, (rh[..., :, None] + rw[..., None, :])
                                                                    .flatten(-2)), "SDPA (dense bias)"),
        Case("patch embed ViT-B/16", f"B={B} {img}px",
             lambda d, t: (_randn(d, t, B, 3, img, img), _randn(d, t, 768, 3, 16, 16, scale=0.05), _randn(d, t, 768),
                           _randn(d, t, 1, 1 + (img // 16) ** 2, 768), _randn(d, t, 1, 1, 768)), (1, 2, 3, 4),
             lambda x, w, b, pos, cls: vitfast.patch_embed(x, w, b, 16, pos_embed=pos, prefix_tokens=cls),
             lambda x, w, b, pos, cls: patch_embed_ref(x, w, b, 16, pos_embed=pos, prefix_tokens=cls),
             "conv2d, cat, add"),
        Case("linear_gelu Swin-T s1 fc1", f"({swin_b * 3136}, 96) -> 384",
             lambda d, t: (_randn(d, t, swin_b * 3136, 96), _randn(d, t, 384, 96, scale=0.1), _randn(d, t, 384)),
             (0, 1, 2), vitfast.linear_gelu, linear_gelu_ref, "F.linear, F.gelu"),
        Case("linear ViT-B/16 qkv", f"({m}, 768) -> 2304",
             lambda d, t: (_randn(d, t, m, 768), _randn(d, t, 2304, 768, scale=0.036), _randn(d, t, 2304)),
             (0, 1, 2), vitfast.linear, linear_ref, "F.linear"),
        Case("patch merging Swin-T s1", f"B={swin_b} 56x56x96",
             lambda d, t: (_randn(d, t, swin_b, 56, 56, 96), _randn(d, t, 384), _randn(d, t, 384),
                           _randn(d, t, 192, 384, scale=0.05)), (0, 1, 2, 3),
             lambda x, w, b, r: vitfast.patch_merging(x, w, b, r), patch_merging_ref, "slice, cat, LN, linear"),
    ]


def _backends(op: str, device: str) -> list:
    """vitfast backends that can run `op` on `device`, the plain-PyTorch one left out (it is the baseline)."""
    dev = torch.device(device)
    return [b for b in backend.BACKENDS if b != "torch" and backend._unavailable(op, b, dev) is None]


_OP_OF = {"layer_norm": "layer_norm", "attention": "attention", "window": "window_attention",
          "patch embed": "patch_embed", "patch merging": "patch_merging", "rel_pos_attention": "rel_pos_attention",
          "linear_gelu": "linear_gelu", "linear ": "linear"}


def _registered_op(case: Case) -> str:
    return next(v for k, v in _OP_OF.items() if case.op.startswith(k))


def _outputs(fn: Callable, inputs: tuple, grad: Sequence[int], weights) -> list:
    """fn's output, and with `weights` (None: forward only) the gradients of <output, weights> for inputs[grad]."""
    if weights is None:
        with torch.no_grad():
            return [fn(*inputs)]
    leaves = [t.detach().requires_grad_(i in grad) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, [leaves[i] for i in grad], weights.to(out.dtype)))


def _errors(outs: list, refs: list) -> list:
    """The max abs error of each tensor (output, then each gradient) against its float64 reference."""
    return [(o.double() - r).abs().max().item() for o, r in zip(outs, refs)]


def _with_backend(name: str, fn: Callable) -> Callable:
    def run():
        with vitfast.use_backend(name):
            return fn()
    return run


def _run_case(case: Case, device: str, dtype: torch.dtype, reps: int, only: Sequence[str],
              skipped: dict) -> list:
    """The case's rows: the baseline and each vitfast backend (those in `only`, if any) that takes its inputs; a
    backend that does not (e.g. onednn, float32 only, in bfloat16) goes into `skipped` with the reason."""
    inputs = case.make(device, dtype)
    dt = str(dtype).replace("torch.", "")
    rows = []
    op = _registered_op(case)
    names = []
    for name in _backends(op, device):
        if only and name not in only:
            continue
        if not only and name == "triton" and device == "cpu":  # (TRITON_INTERPRET=1: minutes a call at these shapes)
            skipped.setdefault(name, set()).add("Triton interprets CPU tensors (TRITON_INTERPRET=1), far too slowly "
                                                "for these shapes; --backend triton runs it")
            continue
        reason = backend.why_not(op, name, *inputs)
        if reason is None:
            names.append(name)
        else:
            skipped.setdefault(name, set()).add(f"{case.op}: {reason}")
    for backward in (False, True):  # forward first: its reference output gives the gradient weights' shape
        weights = None
        if backward:  # one draw, outside the timed calls, the same in every dtype
            weights = torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(0)).to(device)
        ref = [r.double() for r in _outputs(case.baseline, tuple(t.double() for t in inputs), case.grad, weights)]
        base_err = _errors(_outputs(case.baseline, inputs, case.grad, weights), ref)
        errs = []
        for name in names:
            with vitfast.use_backend(name):
                errs.append(_errors(_outputs(case.fn, inputs, case.grad, weights), ref))
        fns = [lambda: _outputs(case.baseline, inputs, case.grad, weights)]
        fns += [_with_backend(name, lambda: _outputs(case.fn, inputs, case.grad, weights)) for name in names]
        base_ms, *ms = [1e3 * statistics.median(t) for t in interleaved(fns, reps, device)]
        common = {"op": case.op, "shape": case.shape, "dtype": dt, "pass": "fwd+bwd" if backward else "fwd"}
        rows.append(dict(common, backend=case.baseline_name, max_err=_worst(base_err), ms=base_ms, speedup=1.0,
                         ok=True))
        eps = torch.finfo(dtype).eps
        for name, err, t in zip(names, errs, ms):
            ok = all(e <= 2 * b + 8 * eps * max(1.0, r.abs().max().item()) for e, b, r in zip(err, base_err, ref))
            rows.append(dict(common, backend=f"vitfast {name}", max_err=_worst(err), ms=t, speedup=base_ms / t, ok=ok))
    return rows


def _worst(errors: list) -> float:
    """The largest error, NaN where any is NaN (max() keeps a NaN only where it comes first)."""
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def _say(text: str = "") -> None:
    """print(text) to stdout at once; one that cannot be written (e.g. a full disk, or closed) ends the job with
    status 2."""
    try:
        if sys.stdout is None:  # (started with stdout closed, >&-: print would write nothing)
            raise OSError("stdout is closed")
        print(text, flush=True)
    except OSError as e:
        if sys.stderr is not None:
            print(f"python -m vitfast: error: cannot write its output: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _progress(i: int, n: int, label: str) -> None:
    if sys.stderr is None:  # (started with stderr closed, 2>&-)
        return
    done = int(30 * i / n)
    try:
        sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{n} {label:<45}" + ("\n" if i == n else ""))
        sys.stderr.flush()
    except OSError:  # (a stderr it cannot write, e.g. a full disk: the bar is not the job's output)
        pass


def _table(rows: list) -> str:
    return markdown_table(
        ["op", "shape", "dtype", "pass", "backend", "max err vs fp64", "time (ms)", "speedup", "ok"],
        [[r["op"], r["shape"], r["dtype"], r["pass"], r["backend"], f"{r['max_err']:.2e}", f"{r['ms']:.3f}",
          f"{r['speedup']:.2f}x", "yes" if r["ok"] else "NO"] for r in rows])


_OUT_FILES = ("vitfast.json", "vitfast.md", "vitfast.png")


def _finite(value):
    """value with each NaN or infinite float as None (JSON has no NaN: json.dump wrote NaN, which parsers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_out(out_dir: str, rows: list, header: str, env: dict, device: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vitfast.json"), "w") as f:
        json.dump(_finite({"info": env, "run_device": device, "date": time.strftime("%Y-%m-%d"), "rows": rows}), f,
                  indent=1, allow_nan=False)
    with open(os.path.join(out_dir, "vitfast.md"), "w") as f:
        f.write(header + "\n\n" + _table(rows) + "\n")
    fast = [r for r in rows if r["backend"].startswith("vitfast")]
    plot_speedups([f"{r['op']} {r['pass']} ({r['backend'][8:]})" for r in fast], [r["speedup"] for r in fast],
                  "speedup vs the PyTorch baseline (hatched: outside the accuracy rule)",
                  os.path.join(out_dir, "vitfast.png"), header, [r["ok"] for r in fast])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "info", "check", "bench"])
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"],
                        help="default: cuda where this torch sees a GPU, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--op", action="append", default=None,
                        help="only this op's cases (repeatable): its name (e.g. window_attention; linear is not "
                             "linear_gelu), or the start of a case's label (e.g. 'attention ViT')")
    parser.add_argument("--backend", action="append", default=None, choices=["triton", "cuda", "cpp", "onednn"],
                        help="only these vitfast backends (repeatable); default: every one available here")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed rounds per measurement (default: 1 for check, 11 on a CPU, 20 on a GPU)")
    parser.add_argument("--out", default=None, help="also write vitfast.json, vitfast.md and vitfast.png here")
    args = parser.parse_args(argv)
    if args.command == "info" and (args.op or args.backend or args.reps is not None or args.out is not None
                                   or args.dtype or args.device):
        parser.error("info takes no --device, --op, --backend, --reps, --out or --dtype")

    env = vitfast.info()  # once: it runs git and reads /proc/cpuinfo
    if args.command == "bench" and not args.op:
        parser.error("bench times the ops named with --op: give at least one (run times them all)")
    if any(not o.strip() for o in args.op or ()):
        parser.error("--op: an empty name (it would match every case)")
    for k, v in env.items():
        _say(f"{k:>18}: {v}")
    if args.command == "info":
        return 0
    try:
        forced = backend.forced_backend()
    except ValueError as e:  # (a bad VITFAST_BACKEND)
        parser.error(str(e))
    if forced == "torch":
        parser.error("VITFAST_BACKEND=torch: the baseline rows are PyTorch's; vitfast's backends are what the job "
                     "measures: unset it, or name one of them")
    if forced and args.backend and set(args.backend) != {forced}:
        parser.error(f"VITFAST_BACKEND={forced} and --backend {' '.join(args.backend)} disagree: give one")
    def asked(names) -> str:  # (how the user asked for these backends, for the messages)
        return f"VITFAST_BACKEND={forced}" if forced else "--backend " + ", ".join(names)
    if forced:  # (each backend's rows run under use_backend(name), which the variable would not reach)
        args.backend = [forced]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False)")
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    reps = args.reps or (1 if args.command == "check" else 20 if gpu else 11)
    every = _cases(gpu)
    names = {_registered_op(c) for c in every}  # (an op's name selects that op only: "linear" is not "linear_gelu")
    def selects(c: Case, o: str) -> bool:
        return _registered_op(c) == o if o in names else c.op.startswith(o)
    cases = [c for c in every if not args.op or any(selects(c, o) for o in args.op)]
    for o in args.op or ():
        if not any(selects(c, o) for c in every):
            parser.error(f"no case matches --op {o}: give an op's name ({', '.join(sorted(names))}) or the start "
                         f"of a case's label ({'; '.join(c.op for c in every)})")
    # why each backend asked for cannot run each case on the device (None: it can)
    unavailable = {(c.op, name): backend._unavailable(_registered_op(c), name, torch.device(args.device))
                   for c in cases for name in args.backend or ()}
    for name in args.backend or ():
        reasons = {unavailable[c.op, name] for c in cases}
        if None not in reasons:
            parser.error(f"{asked([name])} runs none of these cases on {args.device}: {'; '.join(sorted(reasons))}")
    if args.backend:  # (the others would time a baseline alone)
        implemented = [any(unavailable[c.op, name] is None for name in args.backend) for c in cases]
        left = [c.op for c, kept in zip(cases, implemented) if not kept]
        cases = [c for c, kept in zip(cases, implemented) if kept]
    if args.out == "":
        parser.error("--out: give a folder (got an empty path)")
    if args.out is not None:  # (checked before minutes of measuring, not after; the last check: it creates the folder)
        if importlib.util.find_spec("matplotlib") is None:
            parser.error(f"--out {args.out}: writing its plot (vitfast.png) needs matplotlib, which is not installed")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            parser.error(f"--out {args.out}: not a directory")
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            parser.error(f"--out {args.out}: {e}")
        for name in _OUT_FILES:  # (os.access says yes to root on a read-only folder, and nothing of the files)
            path = os.path.join(args.out, name)
            existed = os.path.exists(path)
            try:
                open(path, "a").close()
                if not existed:
                    os.remove(path)
            except OSError as e:
                parser.error(f"--out {args.out}: {e}")
    torch.manual_seed(0)
    rows, skipped = [], {}
    for i, case in enumerate(cases):
        _progress(i, len(cases), f"{case.op} {case.shape}")
        rows += _run_case(case, args.device, dtype, reps, args.backend or (), skipped)
    _progress(len(cases), len(cases), "done")
    if args.backend and left:
        _say(f"note: left out, implemented by no backend of {asked(args.backend)}: {'; '.join(left)}")
    for name, reasons in skipped.items():
        _say(f"note: vitfast {name} skipped: {'; '.join(sorted(reasons))}")
    commit = f" (commit {env['commit']})" if env["commit"] else ""
    device = f"cpu ({_cpu_model()})" if args.device == "cpu" else torch.cuda.get_device_name()  # (env: the GPU's)
    header = (f"vitfast {vitfast.__version__}{commit} on {device}, {dtype}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}; median of {reps} interleaved round(s); speedup = baseline time / "
              f"vitfast time" + ("; check: accuracy only, its times (one round) are not "
                                 "measurements" if args.command == "check" else ""))
    _say("\n" + header + "\n" + _table(rows))
    unwritten = False
    if args.out is not None:
        try:
            _write_out(args.out, rows, header, env, device)
        except OSError as e:  # (past the checks above: e.g. the folder changed while measuring)
            print(f"python -m vitfast: error: --out {args.out}: {e}", file=sys.stderr)
            unwritten = True
    bad = [r for r in rows if not r["ok"]]
    if bad:
        _say(f"\n{len(bad)} backend result(s) exceed 2x the baseline's error: "
             + "; ".join(f"{r['op']} {r['pass']} {r['backend']}" for r in bad))
    idle = [name for name in args.backend or () if not any(r["backend"] == f"vitfast {name}" for r in rows)]
    if idle:
        _say(f"\n{asked(idle)} ran none of the cases (above: why)")
    no_ext = not args.backend and not _ext.HAS_EXT  # (a broken build: the job would check none of its kernels)
    if no_ext:
        _say(f"\nthe C++ and CUDA kernels are not in this run: {_ext.EXT_ERROR}")
    return 2 if unwritten else 1 if bad or idle or no_ext else 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # (not on Windows) Python ignores it: a closed pipe raised BrokenPipeError
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
