"""MetricsWriter / read_metrics / ProgressBar."""

import io
import json

import jax.numpy as jnp
import numpy as np

from mile.metrics import MetricsWriter, ProgressBar, read_metrics


def test_jsonl_and_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path, enabled=True)
    w.write(1, {"loss": jnp.asarray(2.5), "ce": np.float32(3.0), "lr": 1e-3})
    w.write(2, {"loss": float("nan"), "ce": float("inf")})
    w.write(2, {"loss": 1.25}, prefix="eval")
    w.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        json.loads(line)  # strictly valid JSON (no NaN tokens)
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 1, "train/loss": 2.5, "train/ce": 3.0, "train/lr": 1e-3}
    assert isinstance(rows[0]["train/loss"], float)
    assert rows[1] == {"step": 2, "train/loss": None, "train/ce": None}
    assert rows[2] == {"step": 2, "eval/loss": 1.25}
    assert read_metrics(tmp_path) == rows  # a workdir works too
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    # appends on reopen (resumed run)
    w = MetricsWriter(tmp_path, enabled=True)
    w.write(3, {"loss": 1.0})
    w.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 2, 3]


def test_disabled_writer_creates_nothing(tmp_path):
    wd = tmp_path / "wd"
    w = MetricsWriter(wd, enabled=False)
    w.write(1, {"loss": 1.0})
    w.close()
    assert not wd.exists()


def _drive_bar(**kwargs):
    bar = ProgressBar(10, 0, log_every=1, **kwargs)
    for step in range(1, 11):
        bar.update(step, loss=1.0, ce=1.5, tokens_per_s=100.0)
    bar.write("eval loss 0.5")
    bar.close()


def test_disabled_progress_bar_prints_nothing(capsys):
    """Non-zero processes pass enabled=False: nothing on an explicit stream, nothing on stdout or
    stderr; the same calls with enabled=True do print (so the check can tell the two apart)."""
    out = io.StringIO()
    _drive_bar(enabled=False, file=out)
    _drive_bar(enabled=False)  # the default stream, stdout
    assert out.getvalue() == ""
    assert capsys.readouterr() == ("", "")

    _drive_bar(enabled=True, file=out)
    _drive_bar(enabled=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[0].startswith("step 1/10 (10.0%) loss 1.0000")
    assert lines[-1] == "eval loss 0.5"
    printed = capsys.readouterr().out.splitlines()

    def without_eta(rows):
        return [row.split(" eta ")[0] for row in rows]

    assert without_eta(printed) == without_eta(lines)


def test_progress_bar_plain_when_not_tty():
    out = io.StringIO()
    bar = ProgressBar(1000, initial_step=100, enabled=True, log_every=100, file=out)
    for step in range(101, 1001):
        bar.update(step, loss=3.0, ce=3.1, tokens_per_s=12345.0)
    bar.write("eval loss 2.0")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # steps 200..1000 every 100, + the eval line; no spam
    assert lines[0].startswith("step 200/1000 (20.0%) loss 3.0000 ce 3.1000 tok/s 12.3k eta ")
    assert lines[-2].startswith("step 1000/1000")
    assert lines[-1] == "eval loss 2.0"


def test_progress_bar_shows_mfu_when_given():
    out = io.StringIO()
    bar = ProgressBar(10, enabled=True, log_every=1, file=out)
    bar.update(1, loss=3.0, tokens_per_s=1000.0, mfu=0.4123)
    bar.update(2, loss=3.0, tokens_per_s=1000.0)  # on CPU the trainer passes no MFU
    bar.close()
    lines = out.getvalue().splitlines()
    assert " tok/s 1.0k mfu 41.2% eta " in lines[0] and "mfu" not in lines[1]
