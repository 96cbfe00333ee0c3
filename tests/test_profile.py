"""Params and FLOPs in the paper's convention, and `dat-lab profile`."""

import json

import pytest
import torch
from torch import nn

import cli
from dat_lab.profile import FlopCounter, count_flops

PARAMS_TOL, FLOPS_TOL = 0.015, 0.02


def test_flop_convention_known_answers():
    conv = nn.Conv2d(3, 8, 3, padding=1)  # 8 x 4 x 4 outputs x 27 MACs
    assert count_flops(conv, 4) == 8 * 16 * 27
    norm = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.GroupNorm(1, 4))  # GroupNorm not counted
    assert count_flops(norm, 2) == 4 * 4 * 3

    class Sample(nn.Module):
        def forward(self, x):
            grid = torch.zeros(1, 5, 6, 2)
            return nn.functional.grid_sample(x, grid, align_corners=True)

    assert count_flops(Sample(), 4) == 4 * 3 * 5 * 6  # 4 per output element


@pytest.mark.parametrize("knob", [{}, {"key_downsample": [1, 1, 2, 1]}])
def test_flops_do_not_depend_on_the_deformable_path(knob):
    """The CPU's C kernels count as the ops they stand for (grid_sample, the depthwise conv)."""
    import dat_lab
    from dat_lab.models.attention import set_deformable_options

    from dat_lab.models import cpu_kernels

    if not cpu_kernels.available():  # "auto" would be grid_sample too: nothing to compare
        pytest.skip(f"no C kernels: {cpu_kernels._state.get('error')}")
    model = dat_lab.create_model("dat_pico", **knob).eval()
    counts = {}
    for sampler in ("grid_sample", "native"):
        with torch.no_grad(), FlopCounter() as counts[sampler]:
            set_deformable_options(model, sampler=sampler)(torch.zeros(1, 3, 32, 32))
    kernels = {"relative_bias_cpu", "sample_keys_cpu", "depthwise_conv_cpu"}
    assert kernels <= set(counts["native"].by_op) and not kernels & set(counts["grid_sample"].by_op)  # both paths ran
    assert counts["native"].total == counts["grid_sample"].total == count_flops(model, 32), counts


def test_paper_tables_within_tolerance(capsys):
    assert cli.main(["profile", "--paper-tables", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["table"] for r in rows] == [6] * 7 + [7] * 5
    assert set(rows[0]) == {"table", "row", "params_m", "gflops", "paper_params_m", "paper_gflops"}
    for r in rows:
        assert abs(r["params_m"] - r["paper_params_m"]) <= PARAMS_TOL, r
        assert abs(r["gflops"] - r["paper_gflops"]) <= FLOPS_TOL, r
    dat_t = rows[-3]  # "- - D D (DAT-T)": 4.589G / 28.319M measured with the released code and fvcore
    assert dat_t["gflops"] == pytest.approx(4.589, abs=0.001) and dat_t["params_m"] == pytest.approx(28.319, abs=0.001)


def test_profile_variant_cli(capsys):
    assert cli.main(["profile", "dat_pico", "--set", "offset_range=4", "--set", "groups=[1,1,4,8]", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "dat_pico" and row["img_size"] == 32 and row["params_m"] > 0.5
    assert (row["set"], row["in_chans"], row["num_classes"]) == ("offset_range=4; groups=[1,1,4,8]", 3, 1000)
    assert cli.main(["profile", "dat_pico", "--img-size", "64", "--json"]) == 0
    (bigger,) = json.loads(capsys.readouterr().out)
    assert bigger["gflops"] > 3 * row["gflops"]
    assert cli.main(["profile", "dat_pico", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["gflops"] == 0.00757555  # 6 significant digits, as trials keep


@pytest.mark.parametrize("argv,message", [
    (["profile", "dat_tiny", "--set", "groups=5"], "stages[2].groups: 5 offset groups do not divide 12 heads"),
    (["profile", "dat_tiny", "--set", "offset_range"], "--set: 'offset_range' is not key=value"),
    (["profile", "dat_huge"], "unknown model 'dat_huge'; allowed: dat_tiny"),
    (["profile"], "profile: give a VARIANT"),
    (["profile", "dat_tiny", "--paper-tables"], "--paper-tables takes no VARIANT"),
    (["profile", "dat_tiny", "--img-size", "0"], "img_size: 0 must be >= 1"),
    (["profile", "dat_tiny", "--set", "groups=[1,2"], "--set: 'groups=[1,2': the value is not YAML"),
    (["profile", "dat_tiny", "--set", "stages={a: 1, a: 2}"], "the value is not YAML (key 'a' given twice; give it once)"),
    (["profile", "dat_tiny", "--set", "stages=3"], "stages: 3 is not a list of stages"),
    (["profile", "dat_tiny", "--set", "img_size=64", "--img-size", "32"], "--img-size 32 and --set img_size=64: give one"),
    (["profile", "dat_tiny", "--img-size", "abc"],  # argparse's: one line too, no usage block
     "dat-lab: error: argument --img-size: invalid int value: 'abc' (see dat-lab profile --help)"),
])
def test_profile_cli_errors(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's errors exit
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`dat-lab profile dat_pico --json | head -0`: the pipe closes before anything is written."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-W", "ignore::UserWarning", "-m", "cli", "profile", "dat_pico", "--json"],
                            cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # (without a C compiler, the kernels' fallback warns)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and err == "", err


def test_terminal_tables_put_labels_left_and_numbers_right(capsys):
    cli._print_table([{"cell": "a", "status": "done", "value": "9.5 ± 0.1", "trial": 1},
                      {"cell": "bbbb", "status": "pending", "value": "-", "trial": 10}])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert lines == ["│ a    │ done    │ 9.5 ± 0.1 │     1 │", "│ bbbb │ pending │         - │    10 │"]


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"dat-lab {version('dat-lab')}\n"


def test_an_input_too_large_for_memory_is_one_line(monkeypatch, capsys):
    """(dat_pico at 2048 asks for 64 GiB: its global attention's maps grow with the 4th power of the size.)"""
    import dat_lab.profile

    def out_of_memory(model, img_size=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 68719476736 bytes")

    monkeypatch.setattr(dat_lab.profile, "profile_model", out_of_memory)
    assert cli.main(["profile", "dat_pico", "--img-size", "2048"]) == 2
    assert capsys.readouterr().err == ("dat-lab: error: img_size 2048: out of memory running one image through dat_pico "
                                       "(global attention's maps grow with the 4th power of the size; one array alone "
                                       "asked for 64.0 GiB)\n")
