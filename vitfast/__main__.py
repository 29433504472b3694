"""`python -m vitfast [info|check|bench]`: the environment, a correctness check of every backend, and timings.

With no subcommand it runs the main job: every op on its default shapes on this machine's device, each
available backend against plain PyTorch, printing max error against a float64 reference, time and speedup.
"""
import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import vitfast
from vitfast import backend
from vitfast.ops.layer_norm import layer_norm_ref


@dataclass
class Case:
    """One op at one shape: make(device, dtype) -> inputs; fn/ref(*inputs) -> output tensor (ref: plain torch)."""

    op: str
    shape: str
    make: Callable
    fn: Callable
    ref: Callable


def _layer_norm_inputs(m: int, n: int, residual: bool):
    def make(device, dtype):
        x = torch.randn(m, n, device=device, dtype=dtype)
        w, b = torch.randn(n, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)
        return (x, w, b, torch.randn_like(x) if residual else None)
    return make


def _cases(small: bool) -> list:
    m = 8 * 197 if small else 64 * 197
    return [
        Case("layer_norm", f"({m}, 768)", _layer_norm_inputs(m, 768, False),
             lambda x, w, b, r: vitfast.layer_norm(x, 768, w, b, 1e-6),
             lambda x, w, b, r: layer_norm_ref(x, (768,), w, b, 1e-6)),
        Case("layer_norm+residual", f"({m}, 384)", _layer_norm_inputs(m, 384, True),
             lambda x, w, b, r: vitfast.layer_norm(x, 384, w, b, 1e-6, residual=r)[0],
             lambda x, w, b, r: layer_norm_ref(x, (384,), w, b, 1e-6, residual=r)[0]),
    ]


def _time_ms(fn: Callable, device: str, reps: int) -> float:
    """Median wall time of `fn` in ms, synchronizing the GPU around each call."""
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _backends(op: str, device: str) -> list:
    """Backends that can run `op` on `device`, the plain-PyTorch one left out (it is the baseline)."""
    dev = torch.device(device)
    return [b for b in backend.BACKENDS if b != "torch" and backend._unavailable(op.split("+")[0], b, dev) is None]


def _run_case(case: Case, device: str, dtype: torch.dtype, reps: int) -> list:
    inputs = case.make(device, dtype)
    ref64 = case.ref(*[t.double() if t is not None else None for t in inputs])
    plain_out = case.ref(*inputs)
    plain_ms = _time_ms(lambda: case.ref(*inputs), device, reps)
    rows = [dict(op=case.op, shape=case.shape, dtype=str(dtype).replace("torch.", ""), backend="torch (plain)",
                 max_err=(plain_out.double() - ref64).abs().max().item(), ms=plain_ms, speedup=1.0)]
    for name in _backends(case.op, device):
        with vitfast.use_backend(name):
            out = case.fn(*inputs)
            ms = _time_ms(lambda: case.fn(*inputs), device, reps)
        rows.append(dict(op=case.op, shape=case.shape, dtype=rows[0]["dtype"], backend=name,
                         max_err=(out.double() - ref64).abs().max().item(), ms=ms, speedup=plain_ms / ms))
    return rows


def _progress(i: int, n: int, label: str) -> None:
    done = int(30 * i / n)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{n} {label:<40}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def _table(rows: list) -> str:
    head = ["op", "shape", "dtype", "backend", "max err vs fp64", "time (ms)", "speedup vs torch"]
    body = [[r["op"], r["shape"], r["dtype"], r["backend"], f"{r['max_err']:.2e}", f"{r['ms']:.3f}",
             f"{r['speedup']:.2f}x"] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def _print_info() -> None:
    for k, v in vitfast.info().items():
        print(f"{k:>18}: {v}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitfast", description=__doc__)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "info", "check", "bench"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    _print_info()
    if args.command == "info":
        return 0
    small = args.device == "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if small else torch.bfloat16)
    reps = args.reps or (1 if args.command == "check" else 5)
    cases = _cases(small)
    rows = []
    for i, case in enumerate(cases):
        _progress(i, len(cases), f"{case.op} {case.shape}")
        rows += _run_case(case, args.device, dtype, reps)
    _progress(len(cases), len(cases), "done")
    print(f"\nvitfast on {args.device}, {dtype}, median of {reps}:")
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": vitfast.info(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
