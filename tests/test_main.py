"""`python -m vitfast`: the check subcommand passes on this machine and --out writes its three files.

Only the cpp backend runs here: the Triton kernels are interpreted under pytest on a CPU, far too slow at the
main job's shapes (tests/test_<op>.py cover them on small shapes)."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import vitfast
import vitfast.__main__ as vitfast_main
from vitfast.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(vitfast.__file__)))


def test_check_and_out(tmp_path, capsys):
    assert main(["check", "--op", "layer_norm", "--op", "patch merging", "--backend", "cpp", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "layer_norm" in printed and "fwd+bwd" in printed
    assert "check: accuracy only, its times (one round) are not measurements" in printed
    rows = json.loads((tmp_path / "vitfast.json").read_text())["rows"]
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"} and all(r["ok"] for r in rows)
    assert (tmp_path / "vitfast.md").read_text().count("|") > 20
    assert (tmp_path / "vitfast.png").stat().st_size > 1000


def test_interpreted_triton_is_left_out_unless_asked_for(capsys, monkeypatch):
    """With TRITON_INTERPRET=1 in the environment (the tests' own) the default job timed Triton's interpreter at the
    CPU shapes: minutes a call. It is left out with a note; --backend triton still runs it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not vitfast.backend.triton_takes_cpu():
        pytest.skip("triton is not installed")
    assert main(["check", "--op", "layer_norm", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| vitfast triton" not in printed and "Triton interprets CPU tensors" in printed


def test_info_only(capsys):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_info_names_the_source_commit():
    """Results written with --out carry the commit they were measured at (git describe; None outside a checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(vitfast.__file__)))
    info = vitfast.info()
    assert info["vitfast"] == vitfast.__version__
    if not os.path.exists(os.path.join(root, ".git")):
        assert info["commit"] is None
        return
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root, check=True)
    assert info["commit"].startswith(head.stdout.strip()[:12])


def test_a_wrong_gradient_fails_run_and_check(monkeypatch, capsys):
    """Each tensor is held to its own baseline: an input gradient 0.1% off (forward and the weight gradient
    exact) is caught, where the largest error over all tensors (the weight gradient's) hid it; run exits 1 too."""
    real = vitfast.layer_norm

    def skewed(x, *args, **kwargs):
        return real(x + 1e-3 * (x - x.detach()), *args, **kwargs)  # the same values, dx scaled by 1.001
    monkeypatch.setattr(vitfast, "layer_norm", skewed)
    for command in ("run", "check"):
        assert main([command, "--op", "layer_norm", "--backend", "cpp", "--device", "cpu", "--reps", "1"]) == 1
        printed = capsys.readouterr().out
        assert "| NO " in printed and "exceed 2x the baseline's error: layer_norm fwd+bwd vitfast cpp" in printed


def test_bad_flags_are_refused_clearly(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--reps", "0"])
    assert "--reps must be at least 1, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["run", "--device", "cuda"])
        assert "this torch sees no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "--op", "bogus"])  # (it ran and exited 0, ignoring the flag)
    assert "info takes no --device, --op" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "--device", "cpu"])
    # refused before any measuring (a path it cannot create, a backend that runs none of the cases on the device)
    for flags, message in ((["--out", "/proc/vitfast-out"], "--out /proc/vitfast-out: "),
                           (["--out", __file__], f"--out {__file__}: not a directory"),
                           (["--backend", "onednn"], "--backend onednn runs none of these cases on cpu")):
        with pytest.raises(SystemExit) as e:
            main(["check", "--op", "layer_norm", "--device", "cpu", *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_backends_that_cannot_take_the_dtype_are_skipped(capsys):
    """onednn (float32 only) is skipped with a note in bfloat16, not a traceback; asked for alone, it ran none of the
    cases: exit status 1."""
    assert main(["check", "--op", "linear ", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert "note: vitfast onednn skipped: linear" in capsys.readouterr().out
    assert main(["check", "--op", "linear ", "--device", "cpu", "--dtype", "bfloat16", "--backend", "onednn"]) == 1
    assert "--backend onednn ran none of the cases" in capsys.readouterr().out


def test_a_bad_vitfast_backend_variable(monkeypatch, capsys):
    """info reports a bad VITFAST_BACKEND (it is there to diagnose the environment); the other commands refuse it."""
    monkeypatch.setenv("VITFAST_BACKEND", "bogus")
    assert main(["info"]) == 0
    assert "forced_backend: error: VITFAST_BACKEND='bogus'" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["check", "--op", "layer_norm"])
    assert e.value.code == 2 and "VITFAST_BACKEND='bogus' is not a vitfast backend" in capsys.readouterr().err


def test_vitfast_backend_names_the_backend_to_measure(monkeypatch, capsys):
    """A valid VITFAST_BACKEND was shown as forced_backend, then overridden by each backend's use_backend: every row
    was cpp's. It now picks the backend measured, as --backend does (torch, the baseline's, and one unlike
    --backend are refused)."""
    monkeypatch.setenv("VITFAST_BACKEND", "onednn")
    assert main(["check", "--op", "layer_norm", "--op", "linear", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| vitfast onednn" in printed and "vitfast cpp" not in printed
    # (--backend keeps the cases its backend implements: LayerNorm's baseline alone is not timed)
    assert "note: left out, implemented by no backend of VITFAST_BACKEND=onednn: layer_norm" in printed
    assert "| layer_norm" not in printed
    for env, flags, message in (("torch", [], "VITFAST_BACKEND=torch: the baseline rows are PyTorch's"),
                                ("onednn", ["--backend", "cpp"], "VITFAST_BACKEND=onednn and --backend cpp disagree")):
        monkeypatch.setenv("VITFAST_BACKEND", env)
        with pytest.raises(SystemExit) as e:
            main(["check", "--op", "linear", "--device", "cpu", *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.delenv("VITFAST_BACKEND")
    with pytest.raises(SystemExit) as e:
        main(["bench"])  # (it ran every case, as run)
    assert e.value.code == 2 and "bench times the ops named with --op" in capsys.readouterr().err


def test_an_output_it_cannot_print(tmp_path):
    """A closed pipe (| head) or a full disk ended in a traceback and status 1, the status of an accuracy failure;
    with stderr closed (2>&-) or full the first progress bar raised and the job exited 1 without a word; with stdout
    closed (>&-) it printed nothing and exited 0."""
    job = [sys.executable, "-m", "vitfast"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    with subprocess.Popen(job + ["info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as p:
        p.stdout.close()  # (the reader is gone before the first line)
        assert p.wait() == -signal.SIGPIPE and b"Traceback" not in p.stderr.read()
    with open("/dev/full", "w") as full:
        done = subprocess.run(job + ["info"], stdout=full, stderr=subprocess.PIPE, text=True, env=env)
    assert done.returncode == 2 and "cannot write its output: [Errno 28]" in done.stderr
    done = subprocess.run(["bash", "-c", '"$@" >&-', "job", *job, "info"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "cannot write its output: stdout is closed" in done.stderr  # (it exited 0)
    check = ["check", "--op", "patch_merging", "--backend", "cpp", "--device", "cpu"]
    for redirect in ("2>&-", "2>/dev/full"):
        done = subprocess.run(["bash", "-c", f'"$@" {redirect}', "job", *job, *check], capture_output=True, text=True,
                              env=env)
        assert done.returncode == 0 and "| vitfast cpp" in done.stdout, redirect


def _script(path: str):
    """The module of a script of the repository (bench/report.py, ...), for calling its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_report():
    return _script("bench/report.py")


def test_bench_report_refuses_the_main_jobs_json(tmp_path, capsys):
    """bench/report.py reads pytest-benchmark JSON; given the main job's vitfast.json it says so (a KeyError)."""
    report = _bench_report()
    path = tmp_path / "vitfast.json"
    path.write_text(json.dumps({"info": {}, "date": "2026-11-30", "rows": []}))
    with pytest.raises(SystemExit):
        report.main([str(path), "--out", str(tmp_path), "--no-plot"])
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err


def test_bench_report_names_the_file_it_cannot_read(tmp_path, capsys):
    """A file that is not JSON, or is missing, among several: the error named no file (or was a traceback)."""
    report = _bench_report()
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    for path in (bad, tmp_path / "missing.json"):
        with pytest.raises(SystemExit) as e:
            report.main([str(path), "--out", str(tmp_path), "--no-plot"])
        assert e.value.code == 2 and f"{path}: " in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_benchmark_environment_variables_are_checked(monkeypatch):
    """VITFAST_BENCH_REAL=yes was read as off (the tiny models timed while the user meant the real ones), and a
    VITFAST_BENCH_REPS of 0 or "abc" failed inside pytest-benchmark or int() without naming the variable."""
    conftest = _script("bench/conftest.py")
    for value, want in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("VITFAST_BENCH_REAL", value)
        assert conftest.env_flag("VITFAST_BENCH_REAL") is want
    monkeypatch.delenv("VITFAST_BENCH_REAL")
    monkeypatch.delenv("VITFAST_BENCH_REPS", raising=False)
    assert conftest.env_flag("VITFAST_BENCH_REAL", default=True) and conftest.env_count("VITFAST_BENCH_REPS", 3) == 3
    monkeypatch.setenv("VITFAST_BENCH_REAL", "yes")
    with pytest.raises(ValueError, match=r"VITFAST_BENCH_REAL='yes': expected 1 \(on\) or 0 \(off\)"):
        conftest.env_flag("VITFAST_BENCH_REAL")
    for value in ("0", "abc", "-2", "1.5", "\u00b2"):
        monkeypatch.setenv("VITFAST_BENCH_REPS", value)
        with pytest.raises(ValueError, match=f"VITFAST_BENCH_REPS='{value}': expected a whole number of at least 1"):
            conftest.env_count("VITFAST_BENCH_REPS", 3)
    monkeypatch.setenv("VITFAST_BENCH_REPS", "9")
    assert conftest.env_count("VITFAST_BENCH_REPS", 3) == 9


def test_bench_report_refuses_no_benchmarks_and_names_an_out_it_cannot_write(tmp_path, capsys):
    """A JSON without benchmarks wrote a report of "?" fields and exited 0; an --out that is a file gave a bare
    "[Errno 17] File exists"."""
    report = _bench_report()
    empty, bench = tmp_path / "empty.json", tmp_path / "bench.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    extra = {"original_ms": 2.0, "patched_ms": 1.0}
    bench.write_text(json.dumps({"benchmarks": [{"name": "t", "group": "g", "stats": {"median": 1e-3},
                                                 "extra_info": extra}]}))
    for args, message in (([str(empty), "--out", str(tmp_path)], "no benchmarks in"),
                          ([str(bench), "--out", str(empty)], f"--out {empty}: cannot write report.md there")):
        with pytest.raises(SystemExit) as e:
            report.main(args + ["--no-plot"])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_bench_report_splits_the_patched_model_rounds(tmp_path):
    """bench_patched_models.py times original, patched and prepacked in one round (one pytest-benchmark entry): the
    report gave that round one row, "1.00x vs best baseline"; it now gives each variant its row and speedup."""
    extra = {"original_ms": 120.0, "patched_ms": 100.0, "prepacked_ms": 80.0, "speedup_patched_paired": 1.2,
             "patched_max_err": 2.5e-6, "patched_err_over_bound": 0.25}
    bench = {"name": "test_model[vit]", "group": "vit inference B=1", "stats": {"median": 0.3}, "extra_info": extra}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [bench], "datetime": "2026-12-01"}))
    report = _bench_report()
    text = report.markdown(*report.load(str(path)))
    cells = {tuple(c.strip() for c in line.split("|")[2:4]): [c.strip() for c in line.split("|")[-3:-1]]
             for line in text.splitlines() if line.startswith("| vit")}
    assert cells == {("original", "120.000"): ["", "1.00x"],
                     ("vitfast-patched", "100.000"): ["2.5e-06 (0.25)", "1.20x"],
                     ("vitfast-prepacked", "80.000"): ["", "1.50x"]}, text


def test_benchmarks_check_their_outputs_against_float64():
    """bench/conftest.py's check_accuracy (run after each benchmark is timed): the main job's rule on every output and
    gradient; a vitfast row that breaks it fails, another library's row records it; a NaN breaks it."""
    conftest = _script("bench/conftest.py")

    class Benchmark:
        def __init__(self):
            self.extra_info = {}

    x, w = torch.randn(300, 64), torch.randn(64, 64)

    def reference(x, w):
        return {"out": x @ w, "ids": torch.arange(3)}, (x.sum(0),)  # (nested; the int tensor is not compared)
    exact = reference(x, w)
    bench = Benchmark()
    conftest.check_accuracy(bench, "vitfast-cpp", exact, (x, w), reference)
    assert bench.extra_info["max_err"] == bench.extra_info["baseline_max_err"] > 0
    assert bench.extra_info["err_over_bound"] < 1
    wrong = ({"out": exact[0]["out"] + 1e-3}, exact[1])
    with pytest.raises(pytest.fail.Exception, match=r"vitfast-cpp: max abs errors \["):
        conftest.check_accuracy(Benchmark(), "vitfast-cpp", wrong, (x, w), reference)
    bench = Benchmark()
    conftest.check_accuracy(bench, "sdpa-flash", wrong, (x, w), reference)
    assert bench.extra_info["err_over_bound"] > 1
    nan = (exact[0], (exact[1][0].clone().index_fill_(0, torch.tensor([5]), math.nan),))
    bench = Benchmark()
    with pytest.raises(pytest.fail.Exception):
        conftest.check_accuracy(bench, "vitfast-cpp", nan, (x, w), reference)
    assert math.isnan(bench.extra_info["err_over_bound"])
    with pytest.raises(AssertionError, match=r"outputs \[\(300, 64\)\], reference \[\(300, 64\), \(64,\)\]"):
        conftest.check_accuracy(Benchmark(), "vitfast-cpp", exact[0], (x, w), reference)


def test_bench_report_gives_a_cpu_throughput_in_gflops(tmp_path):
    """A CPU row's throughput (below 1 TFLOP/s) read "0.0 TFLOP/s"; the header already switched to GFLOP/s."""
    bench = {"name": "test_fwd[cpu]", "group": "ln fwd", "stats": {"median": 0.002},
             "extra_info": {"impl": "vitfast-cpp", "TFLOP/s": 0.0123, "GB/s": 4.56, "max_err": 3.21e-6,
                            "err_over_bound": 0.456}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [bench], "datetime": "2026-12-01"}))
    report = _bench_report()
    row = next(line for line in report.markdown(*report.load(str(path))).splitlines() if line.startswith("| ln fwd"))
    assert [c.strip() for c in row.split("|")[5:8]] == ["12.3 GFLOP/s, 4.6 GB/s", "", "3.2e-06 (0.46)"], row


def test_out_without_matplotlib_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    """--out writes a plot with matplotlib: without it the job failed with a traceback (exit 1) after measuring."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        main(["check", "--op", "layer_norm", "--device", "cpu", "--out", str(tmp_path)])
    assert e.value.code == 2 and "needs matplotlib, which is not installed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_op_names_select_their_cases(capsys):
    """--op takes an op's own name (window_attention: its case labels are "window attention ...", with a space, and
    the name matched nothing); a name that matches nothing is refused with the names and labels there are."""
    assert main(["check", "--op", "patch_merging", "--backend", "cpp", "--device", "cpu"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    # the header, then fwd and fwd+bwd of the baseline and of vitfast cpp
    assert len(rows) == 5 and all(r.startswith("| patch merging") for r in rows[1:]), rows
    with pytest.raises(SystemExit) as e:
        main(["check", "--op", "window_attn", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no case matches --op window_attn" in err and "window_attention" in err
    with pytest.raises(SystemExit) as e:  # (beside one that matches, the typo was dropped silently)
        main(["check", "--op", "layer_nrom", "--op", "patch_merging", "--device", "cpu"])
    assert e.value.code == 2 and "no case matches --op layer_nrom" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # ("" is the start of every label: bench --op "" timed every case)
        main(["bench", "--op", "", "--device", "cpu"])
    assert e.value.code == 2 and "--op: an empty name" in capsys.readouterr().err


def test_a_nan_error_is_reported_as_nan(monkeypatch, capsys):
    """The table's max error was Python's max() over the tensors, which drops a NaN unless it comes first: a NaN
    weight gradient printed as the (small) error of the output."""
    real = vitfast.layer_norm

    def nan_weight_grad(x, normalized_shape, weight, *args, **kwargs):
        if weight.requires_grad:
            weight = weight.clone()
            weight.register_hook(lambda g: torch.full_like(g, torch.nan))
        return real(x, normalized_shape, weight, *args, **kwargs)
    monkeypatch.setattr(vitfast, "layer_norm", nan_weight_grad)
    assert main(["check", "--op", "layer_norm", "--backend", "cpp", "--device", "cpu"]) == 1
    rows = [r for r in (line.split("|") for line in capsys.readouterr().out.splitlines())
            if len(r) > 5 and r[1].strip() == "layer_norm" and r[5].strip() == "vitfast cpp"]
    (fwd,), (bwd,) = ([r for r in rows if r[4].strip() == p] for p in ("fwd", "fwd+bwd"))
    assert fwd[6].strip() != "nan" and bwd[6].strip() == "nan" and bwd[-2].strip() == "NO", rows


def test_job_fails_when_the_extension_did_not_load(monkeypatch, capsys):
    """Without vitfast._C (a failed build, or one against another torch) the default job measured the baseline and
    oneDNN only, said nothing and exited 0: `make run` passed on a broken build. Now it names the error, exit 1."""
    monkeypatch.setattr(vitfast._ext, "HAS_EXT", False)
    monkeypatch.setattr(vitfast._ext, "EXT_ERROR", "vitfast._C could not be imported (simulated)")
    monkeypatch.setattr(vitfast_main, "_run_case", lambda *args: [])
    assert main(["check", "--op", "layer_norm", "--device", "cpu"]) == 1
    assert "the C++ and CUDA kernels are not in this run: vitfast._C could not be imported (simulated)" in (
        capsys.readouterr().out)


def test_triton_on_cpu_names_the_interpreter(monkeypatch, capsys):
    """--backend triton on CPU tensors without TRITON_INTERPRET=1 said layer_norm "has no triton implementation for
    cpu tensors"; the reason is the interpreter."""
    if not vitfast.backend.has_triton():
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not vitfast.backend.triton_takes_cpu()
    with pytest.raises(SystemExit) as e:
        main(["check", "--op", "layer_norm", "--backend", "triton", "--device", "cpu"])
    assert e.value.code == 2 and "Triton runs CPU tensors only under TRITON_INTERPRET=1" in capsys.readouterr().err


@pytest.mark.parametrize("args,env,message", [
    (["--dry-run", "--bogus"], {}, "usage: bash bench/gpu_run.sh [--dry-run]"),
    ([], {"GPU_RUN_TOTAL": "abc"}, "GPU_RUN_TOTAL must be a whole number of seconds from 60 to 525"),
    ([], {"GPU_RUN_TOTAL": "09"}, "GPU_RUN_TOTAL must be"),
    ([], {"GPU_RUN_TOTAL": "4"}, "GPU_RUN_TOTAL must be"),
    ([], {"GPU_RUN_SKIP": "x"}, "GPU_RUN_SKIP takes the stages c and d only")])
def test_gpu_run_refuses_bad_arguments(tmp_path, args, env, message):
    """bench/gpu_run.sh refuses what it cannot honour before it starts (GPU_RUN_TOTAL=4 ran no stage and said ok)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(vitfast.__file__)))
    done = subprocess.run(["bash", os.path.join(root, "bench", "gpu_run.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path / "out"), **env}, timeout=60)
    assert done.returncode == 2 and message in done.stderr and not (tmp_path / "out").exists(), done.stderr


def _no_measuring(case, *args):
    raise AssertionError("measured before refusing the arguments")


def test_out_it_cannot_write_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    """--out was checked with os.access (always yes for root) and not for its files: a folder holding a directory
    named vitfast.json measured every case, then failed with a traceback (exit 1); an empty --out wrote nothing."""
    monkeypatch.setattr(vitfast_main, "_run_case", _no_measuring)
    (tmp_path / "vitfast.json").mkdir()
    for out, message in ((str(tmp_path), "vitfast.json"), ("", "--out: give a folder")):
        with pytest.raises(SystemExit) as e:
            main(["check", "--op", "layer_norm", "--device", "cpu", "--out", out])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["vitfast.json"]  # (the files it tried are not left behind)


def _one_row(case, *args):
    return [{"op": case.op, "shape": case.shape, "dtype": "float32", "pass": "fwd", "backend": "vitfast cpp",
             "max_err": math.nan, "ms": math.inf, "speedup": 1.0, "ok": False}]


def test_out_writes_valid_json_and_a_late_failure_in_one_line(tmp_path, monkeypatch, capsys):
    """A NaN error was written as NaN, which is not JSON (JSON.parse refuses it); a write that failed after
    measuring ended in a traceback."""
    monkeypatch.setattr(vitfast_main, "_run_case", _one_row)
    assert main(["check", "--op", "layer_norm", "--device", "cpu", "--out", str(tmp_path)]) == 1

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    data = json.loads((tmp_path / "vitfast.json").read_text(), parse_constant=refuse)
    assert [(r["max_err"], r["ms"]) for r in data["rows"]] == [(None, None)] * 2
    capsys.readouterr()

    def no_space(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(vitfast_main, "plot_speedups", no_space)
    assert main(["check", "--op", "layer_norm", "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: --out {tmp_path}: [Errno 28] No space left on device\n") and "Traceback" not in err


def test_plots_carry_their_header_and_mark_inaccurate_rows(tmp_path, monkeypatch):
    """The PNGs had no device, versions or date, and drew a row outside the accuracy rule like any other."""
    figure = pytest.importorskip("matplotlib.figure")
    seen = {}

    def savefig(fig, path, **kwargs):
        ax = fig.axes[0]
        seen.update(title=fig._suptitle.get_text(), hatches=[bar.get_hatch() for bar in ax.patches])
    monkeypatch.setattr(figure.Figure, "savefig", savefig)
    rows = [{"op": "layer norm", "shape": "(8, 16)", "dtype": "float32", "pass": "fwd", "backend": f"vitfast {b}",
             "max_err": 1e-6, "ms": 1.0, "speedup": s, "ok": ok}
            for b, s, ok in (("cpp", 1.5, True), ("torch", 0.5, False))]
    vitfast_main._write_out(str(tmp_path), rows, "vitfast 0.1 on cpu, torch.float32, 2026-12-01", {}, "cpu")
    assert "vitfast 0.1 on cpu" in seen["title"] and seen["hatches"] == [None, "//"]


def test_the_header_names_the_device_it_ran_on(monkeypatch, capsys):
    """--device cpu on a machine with a GPU: the header named the GPU (vitfast.info's device) for CPU timings."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Some GPU")
    monkeypatch.setattr(vitfast_main, "_run_case", lambda case, *args: [])
    assert main(["check", "--op", "layer_norm", "--device", "cpu"]) == 0
    (header,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vitfast ")]
    assert " on cpu (" in header and "Some GPU" not in header, header


def test_an_op_name_selects_that_op_only(monkeypatch):
    """--op linear also ran "linear_gelu Swin-T s1 fc1" (its label starts with linear); a label's start still
    selects by label."""
    seen = []
    monkeypatch.setattr(vitfast_main, "_run_case", lambda case, *args: seen.append(case.op) or [])
    for op, ops in (("linear", ["linear ViT-B/16 qkv"]), ("linear_gelu", ["linear_gelu Swin-T s1 fc1"]),
                    ("lin", ["linear_gelu Swin-T s1 fc1", "linear ViT-B/16 qkv"])):
        seen.clear()
        assert main(["check", "--op", op, "--device", "cpu"]) == 0
        assert seen == ops, (op, seen)


@pytest.mark.parametrize("value,interprets", [("true", True), ("on", True), ("1", True), ("0", False),
                                              ("off", False)])
def test_triton_interpret_reads_tritons_spelling(monkeypatch, value, interprets):
    """TRITON_INTERPRET=true (or yes, on) makes Triton interpret, but vitfast read only "1": it refused --backend
    triton on CPU tensors "only under TRITON_INTERPRET=1" and info said triton_interpret: False."""
    if not vitfast.backend.has_triton():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert vitfast.backend._interpret_requested() is interprets  # (triton_interpret: also how Triton was imported)


def test_triton_interpret_set_after_import_is_refused_clearly():
    """TRITON_INTERPRET=1 set after `import vitfast` (a notebook cell): vitfast said it interpreted and chose triton
    for CPU tensors, but Triton, imported by then (through torch._dynamo), had compiled its own helpers (tl.sum, ...):
    the first call failed inside Triton ("Cannot call @triton.jit'd outside of the scope of a kernel"). Now
    triton_interpret() is False there and a forced triton backend names the cause."""
    if not vitfast.backend.has_triton():
        pytest.skip("triton is not installed")
    code = """if True:
        import os, torch, vitfast
        os.environ["TRITON_INTERPRET"] = "1"
        assert not vitfast.backend.triton_interpret() and not vitfast.info()["triton_interpret"]
        x = torch.randn(4, 64)
        assert vitfast.layer_norm(x, 64).shape == x.shape  # the automatic choice is unaffected
        try:
            with vitfast.use_backend("triton"):
                vitfast.layer_norm(x, 64)
        except ValueError as e:
            assert "set before Triton is imported" in str(e), e
        else:
            raise AssertionError("ran")
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


def test_cpu_choice_help_cases_and_forced_backend(monkeypatch, capsys):
    """bench/cpu_choice.py: --help cut its description mid-sentence; a -k that matches no case printed an empty
    table (exit 0); with a backend forced, its "vitfast" column timed that backend (e.g. the torch reference)."""
    cpu_choice = _script("bench/cpu_choice.py")
    with pytest.raises(SystemExit) as e:
        cpu_choice.main(["--help"])
    assert e.value.code == 0 and "training (forward + backward). The table it prints is what" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cpu_choice.main(["-k", "no such case"])
    assert e.value.code == 2 and "-k 'no such case' is in no case's name" in capsys.readouterr().err
    monkeypatch.setenv("VITFAST_BACKEND", "torch")
    with pytest.raises(SystemExit) as e:
        cpu_choice.main(["-k", "layer_norm swin s4 b1"])
    assert e.value.code == 2 and "backend is forced to 'torch'" in capsys.readouterr().err
    monkeypatch.delenv("VITFAST_BACKEND")
    with vitfast.use_backend("cpp"), pytest.raises(SystemExit) as e:
        cpu_choice.main(["-k", "layer_norm swin s4 b1"])
    assert e.value.code == 2 and "backend is forced to 'cpp'" in capsys.readouterr().err


def test_bench_report_on_a_cpu_and_a_group_without_baseline(tmp_path):
    """A CPU's matmul peak (0.0158 TFLOP/s) printed as "0.0 TFLOP/s", and a group with no baseline row as "nanx"."""
    report = _bench_report()
    extra = {"impl": "vitfast-cpp", "peak_GB/s": 3.2, "peak_TFLOP/s": 0.0158}
    bench = {"name": "test_forward[768-vitfast-cpp]", "group": "layer_norm 768", "stats": {"median": 1e-3},
             "extra_info": extra}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [bench], "datetime": "2026-12-01"}))
    text = report.markdown(*report.load(str(path)))
    assert "3 GB/s copy, 15.8 GFLOP/s matmul" in text and text.rstrip().split("|")[-2].strip() == "-", text


def test_compile_triton_refuses_a_markdown_path_before_compiling(tmp_path, monkeypatch, capsys):
    """scripts/compile_triton.py --markdown to a path it cannot write compiled everything first, then failed with a
    traceback that lost the summary and the failures."""
    pytest.importorskip("triton")
    compile_triton = _script("scripts/compile_triton.py")
    monkeypatch.setattr(compile_triton, "compile_only", _no_measuring)
    path = tmp_path / "missing" / "kernels.md"
    with pytest.raises(SystemExit) as e:
        compile_triton.main(["--quick", "--cases", "layer_norm", "--markdown", str(path)])
    assert e.value.code == 2 and f"--markdown {path}: " in capsys.readouterr().err


def _gpu_run(tmp_path, args=(), **env):
    """bench/gpu_run.sh with a stand-in PYTHON that does nothing and succeeds: the script's own logic, no stage's."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_run.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), **env}, timeout=60)


def test_gpu_run_help_out_and_skip(tmp_path):
    """gpu_run.sh: --help exited 2; an OUT that is a file ran every stage into "Not a directory" errors (exit 1);
    GPU_RUN_SKIP="c,d" or "cd" skipped nothing (only " c " matched), and a mistyped letter passed silently."""
    done = _gpu_run(tmp_path, ["--help"])
    assert done.returncode == 0 and "Usage, from the repository root" in done.stdout, done.stderr
    (tmp_path / "file").write_text("")
    done = _gpu_run(tmp_path, OUT=str(tmp_path / "file"))
    assert done.returncode == 2 and done.stderr == f"bench/gpu_run.sh: OUT={tmp_path / 'file'} is not a writable " \
        "directory\n" and not done.stdout, done.stdout + done.stderr
    for skip in ("c,d", "cd"):
        done = _gpu_run(tmp_path, GPU_RUN_SKIP=skip, GPU_RUN_TESTS="tests/test_main.py")
        summary = (tmp_path / "out" / "summary.md").read_text()
        assert done.returncode == 0 and "- (c) correctness at model shapes: skipped" in summary \
            and "- (d) benchmarks: skipped" in summary, summary


def test_gpu_run_prints_a_stage_not_run_with_budget_0(tmp_path):
    """A stage not run for want of time printed its budget as the (negative) time left: "budget -15 s"."""
    script = open(os.path.join(ROOT, "bench", "gpu_run.sh")).read()
    functions = script[script.index("left() {"):script.index("\nENV_PY=")]
    summary = tmp_path / "summary.md"
    done = subprocess.run(["bash", "-c", functions + "\nTOTAL=60; START=$(( SECONDS - 75 )); RESERVE=0; "
                           f"SUMMARY={summary}; stage '(e) full test suite' $(left) /dev/null 1 true"],
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 0 and summary.read_text() == "- (e) full test suite: budget 0 s, took 0 s, not run: no " \
        "time left\n", done.stderr
