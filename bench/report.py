"""Turns a pytest-benchmark JSON file into a markdown table and PNG plots.

    python bench/report.py bench.json [more.json ...] --out DIR [--no-plot]

Rows are grouped by benchmark group (one op or model at one shape); within a group each implementation
(extra_info["impl"]: "vitfast-<backend>", "torch", "sdpa-flash", ...; bench_patched_models.py's variants, timed
in one round: "original", "vitfast-patched", "vitfast-prepacked", "compiled") gets its median time, the roofline
floor of the shape (bytes over the measured copy bandwidth, FLOPs over the measured matmul peak, whichever
is larger) with the time's multiple of it, its throughput, its peak memory (on a GPU), its max abs error against
float64 with the multiple of the accuracy bound it reaches (bench/conftest.py check_accuracy; above 1 breaks it) and
its speedup against the fastest non-vitfast implementation of the group. Several JSON files (e.g. one pytest run
per part of bench/gpu_run.sh) make one report.
"""
import argparse
import importlib.util
import json
import math
import os
from collections import defaultdict

from vitfast.report import markdown_table, plot_speedups


def load(*paths: str) -> tuple:
    """The first file's metadata with every file's benchmarks, and those benchmarks by group.

    Raises:
        ValueError: a file that cannot be read, or is not pytest-benchmark's JSON (`python -m vitfast --out` writes
            its own report), or no benchmark in any file.
    """
    data = None
    for path in paths:
        try:
            with open(path) as f:
                part = json.load(f)
        except (OSError, ValueError) as e:  # (json's errors named no file)
            raise ValueError(f"{path}: {e}") from e
        if not isinstance(part, dict) or "benchmarks" not in part:
            raise ValueError(f"{path} is not a pytest-benchmark JSON (--benchmark-json; no 'benchmarks' key)"
                             + ("; `python -m vitfast --out` writes its report, vitfast.md, next to it"
                                if isinstance(part, dict) and "rows" in part else ""))
        if data is None:
            data = part
        else:
            data["benchmarks"] += part["benchmarks"]
    if not data["benchmarks"]:
        raise ValueError(f"no benchmarks in {', '.join(paths)} (every benchmark skipped or deselected?)")
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        extra, group = b["extra_info"], b["group"] or b["name"]
        if "original_ms" in extra:  # bench_patched_models.py: one round times every variant; each its own row
            for key, ms in extra.items():
                if key.endswith("_ms"):
                    name = key[:-3]
                    errors = {k[len(name) + 1:]: v for k, v in extra.items()  # (patched_max_err, ...)
                              if k in (f"{name}_max_err", f"{name}_err_over_bound")}
                    groups[group].append((f"vitfast-{name}" if name in ("patched", "prepacked") else name,
                                          ms / 1e3, errors))
            continue
        groups[group].append((extra.get("impl", b["name"]), b["stats"]["median"], extra))
    return data, groups


def header(data: dict) -> str:
    m = data.get("machine_info", {})
    bench = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    device = bench.get("device", m.get("cpu", {}).get("brand_raw", "?"))
    peaks = next((b["extra_info"] for b in data["benchmarks"] if "peak_GB/s" in b["extra_info"]), {})
    roof = (f" Measured peaks: {peaks['peak_GB/s']:.0f} GB/s copy, {_flops(peaks.get('peak_TFLOP/s', 0))} matmul."
            if peaks else "")
    return (f"Device: {device}; torch {bench.get('torch', '?')}; python {m.get('python_version', '?')}; "
            f"date {data.get('datetime', '?')[:10]}; medians of pytest-benchmark rounds.{roof}")


def _flops(tflops: float) -> str:
    """A rate in TFLOP/s, or in GFLOP/s below 1 TFLOP/s (a CPU's printed as 0.0 TFLOP/s)."""
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s"


def speedups(rows: list) -> dict:
    """impl -> best-baseline time / impl time (baselines are the non-vitfast implementations)."""
    baseline = min((t for impl, t, _ in rows if not impl.startswith("vitfast")), default=None)
    return {impl: (baseline / t if baseline else float("nan")) for impl, t, _ in rows}


def markdown(data: dict, groups: dict) -> str:
    rows = []
    for group, entries in groups.items():
        sp = speedups(entries)
        for impl, t, extra in sorted(entries, key=lambda r: r[1]):
            tput = ", ".join(([_flops(extra["TFLOP/s"])] if "TFLOP/s" in extra else [])
                             + ([f"{extra['GB/s']:.1f} GB/s"] if "GB/s" in extra else []))
            floor = extra.get("floor_ms")
            roof = f"{floor:.3f} ({t * 1e3 / floor:.1f}x)" if floor else ""
            mem = (f"{extra['peak_MiB_above_inputs']:.0f}" if "peak_MiB_above_inputs" in extra
                   else f"{extra['peak_mem_MiB']:.0f} (with inputs)" if "peak_mem_MiB" in extra else "")  # (before 12-01)
            err = f"{extra['max_err']:.2g} ({extra['err_over_bound']:.2f})" if "max_err" in extra else ""
            vs = "-" if math.isnan(sp[impl]) else f"{sp[impl]:.2f}x"  # (no baseline in the group: it read "nanx")
            rows.append([group, impl, f"{t * 1e3:.3f}", roof, tput, mem, err, vs])
    table = markdown_table(["benchmark", "impl", "median (ms)", "roofline floor ms (time/floor)", "throughput",
                            "peak MiB above inputs", "max err (/ bound)", "vs best baseline"], rows)
    return header(data) + "\n\n" + table + "\n"


def plot(data: dict, groups: dict, path: str) -> None:
    labels, values = [], []
    for group, entries in groups.items():
        best = max((v for impl, v in speedups(entries).items() if impl.startswith("vitfast")), default=None)
        if best is not None:
            labels.append(group)
            values.append(best)
    plot_speedups(labels, values, "speedup of the fastest vitfast backend vs the fastest baseline", path, header(data))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_files", nargs="+")
    parser.add_argument("--out", default=".")
    parser.add_argument("--no-plot", action="store_true", help="write report.md only, not speedup.png")
    args = parser.parse_args(argv)
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("the plot (speedup.png) needs matplotlib, which is not installed: install it or pass --no-plot")
    try:
        data, groups = load(*args.json_files)
    except ValueError as e:
        parser.error(str(e))
    try:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(markdown(data, groups))
    except OSError as e:
        parser.error(f"--out {args.out}: cannot write report.md there: {e}")
    if not args.no_plot:
        plot(data, groups, os.path.join(args.out, "speedup.png"))
    print(markdown(data, groups))


if __name__ == "__main__":
    main()
