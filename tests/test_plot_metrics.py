"""python -m training.plot_metrics: the curves drawn are exactly the runs' logged values (read back from the
figure), the PNG is written, and bad input is one line (the module's entry point is run_cli(main))."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from training.cli import run_cli
from training.plot_metrics import collect_series, main, plot_series, trailing_mean


def _run(root, name, records, extra_lines=()):
    logs = root / name / "logs"
    logs.mkdir(parents=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (logs / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / name)


def test_curves_hold_the_logged_values(tmp_path):
    a = _run(tmp_path, "scm", [{"step": s, "loss_sCM": 1.0 / s, "grad_norm": 0.5 * s, "lr": 1e-5} for s in (1, 2, 3)],
             extra_lines=['{"step": 4, "loss_s'])  # a line cut short by kill -9 is ignored
    b = _run(tmp_path, "mf", [{"step": s, "loss": 2.0 - s / 10, "grad_norm": 1.0} for s in (2, 4)])
    series = collect_series([a, b])
    assert list(series) == ["loss_sCM", "loss", "grad_norm"]
    assert series["loss_sCM"] == {a: ([1, 2, 3], [1.0, 0.5, 1.0 / 3])} and b not in series["loss_sCM"]
    assert series["grad_norm"][b] == ([2, 4], [1.0, 1.0])
    fig = plot_series(series)
    assert len(fig.axes) == 3
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[2].lines}
    assert drawn == {a: ([1, 2, 3], [0.5, 1.0, 1.5]), b: ([2, 4], [1.0, 1.0])}

    out = tmp_path / "plots" / "curves.png"
    assert main([a, b, "--out", str(out), "--smooth", "2"]) == out
    width, height = Image.open(out).size
    assert width > 500 and height > 3 * 200


def test_trailing_mean():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert trailing_mean([2.0, 4.0], 5) == [2.0, 3.0]


@pytest.mark.parametrize("case,message", [("missing", "no logs/metrics.jsonl there"),
                                          ("key", "no run logged 'nope'; available: grad_norm, loss")])
def test_bad_input_is_one_line(tmp_path, capsys, case, message):
    run = _run(tmp_path, "r", [{"step": 1, "loss": 1.0, "grad_norm": 2.0}])
    args = [str(tmp_path / "none")] if case == "missing" else [run, "--keys", "nope"]
    assert run_cli(lambda: main([*args, "--out", str(tmp_path / "c.png")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "c.png").exists()
