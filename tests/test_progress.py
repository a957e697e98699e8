"""Progress of long jobs: a live line with rate and ETA on a terminal, plain lines in logs."""
from __future__ import annotations

import io

from uclip_cli.progress import Progress, StageProgress
from uclip_cli.train.config import ProgressEvent


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_one_rewritten_line_with_rate_and_eta():
    out = Terminal()
    bar = Progress("indexing", 200, stream=out, interval=0)
    bar.start -= 10                      # ten seconds in
    bar.advance(50)
    bar.close()
    text = out.getvalue()
    assert text.startswith("\r\x1b[2K") and text.endswith("\n") and text.count("\n") == 1
    assert "25.0% 50/200 images" in text and "5.0 images/s" in text and "ETA 00:30" in text


def test_a_log_gets_plain_lines_and_no_duplicate_at_close():
    out = io.StringIO()
    bar = Progress("indexing", 3, stream=out, interval=0)
    for _ in range(3):
        bar.advance()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[-1].startswith("indexing: 100.0% 3/3 images")


def test_disabled_progress_prints_nothing():
    out = Terminal()
    bar = Progress("indexing", 3, stream=out, enabled=False)
    bar.advance(3)
    bar.close()
    assert out.getvalue() == ""


def test_stage_progress_uses_the_jobs_own_rate_and_prints_epoch_summaries():
    out = io.StringIO()
    progress = StageProgress(stream=out)
    progress(ProgressEvent("train", 10, 100, 12.5, "steps"))
    progress(ProgressEvent("epoch", 1, 5, 3.0, "epochs", info={"train": {"total": 1.5}, "heldout": None}))
    progress.close()
    text = out.getvalue()
    assert "train:  10.0% 10/100 steps  12.5 steps/s  ETA 00:07" in text
    assert "epoch 1/5  train: total=1.5000" in text and "heldout" not in text
