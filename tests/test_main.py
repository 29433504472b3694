"""`python -m vitfast`: the check subcommand passes on this machine and --out writes its three files.

Only the cpp backend runs here: the Triton kernels are interpreted under pytest on a CPU, far too slow at the
main job's shapes (tests/test_<op>.py cover them on small shapes)."""
import json

from vitfast.__main__ import main


def test_check_and_out(tmp_path, capsys):
    assert main(["check", "--op", "layer_norm", "--op", "patch merging", "--backend", "cpp",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "layer_norm" in printed and "fwd+bwd" in printed
    rows = json.loads((tmp_path / "vitfast.json").read_text())["rows"]
    assert {r["pass_"] for r in rows} == {"fwd", "fwd+bwd"} and all(r["ok"] for r in rows)
    assert (tmp_path / "vitfast.md").read_text().count("|") > 20
    assert (tmp_path / "vitfast.png").stat().st_size > 1000


def test_info_only(capsys):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out
