"""Interleaved timing, markdown tables and speedup plots, shared by `python -m vitfast` and bench/."""
import textwrap
import time
from typing import Callable, List, Optional, Sequence

import torch


def timed_round(fns: Sequence[Callable], times: Sequence[list], device: str = "cpu", reverse: bool = False) -> None:
    """Calls each fn once, in turn (last to first with `reverse`), appending its wall time in seconds to the list
    of the same index in `times`; on a CUDA device the GPU is synchronized before and after each call."""
    cuda = torch.device(device).type == "cuda"
    for i in (reversed(range(len(fns))) if reverse else range(len(fns))):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fns[i]()
        if cuda:
            torch.cuda.synchronize(device)
        times[i].append(time.perf_counter() - t0)


def interleaved(fns: Sequence[Callable], reps: int, device: str = "cpu") -> List[List[float]]:
    """Wall times in seconds of `reps` calls of each fn, after one warm-up round (compilation, autotuning,
    caches): round by round, each fn once, the order reversed every other round, so that the drift of a shared
    machine's speed and the order hit every fn alike. Returns one list of times per fn."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for r in range(reps):
        timed_round(fns, times, device, reverse=r % 2 == 1)
    return times


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A padded markdown table (readable as plain text too)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def plot_speedups(labels: Sequence[str], values: Sequence[float], xlabel: str, path: str, title: str,
                  ok: Optional[Sequence[bool]] = None) -> None:
    """A horizontal bar chart of speedups (green at or above 1x, red below; grey and hatched where `ok` is False:
    a result outside the accuracy rule) written to `path` as PNG, under `title` (the device, versions and date the
    figures belong to)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [True] * len(values) if ok is None else list(ok)
    width = max(9.0, 5.0 + 0.08 * max((len(label) for label in labels), default=0))  # (room for long labels)
    fig, ax = plt.subplots(figsize=(width, 0.32 * len(labels) + 1.9))
    colors = ["tab:gray" if not good else "tab:green" if v >= 1 else "tab:red" for v, good in zip(values, ok)]
    bars = ax.barh(list(labels), list(values), color=colors)
    for bar, good in zip(bars, ok):
        if not good:
            bar.set_hatch("//")
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=8)  # (over the figure: long labels shift the axes)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
