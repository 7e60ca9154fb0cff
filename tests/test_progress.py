"""Progress in logs: whole lines, at most one per interval, from a timer too; tqdm on a TTY."""

from __future__ import annotations

import io
import time

from tqdm import tqdm

from ptum.progress import LogLines, _clock, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_and_a_log_gets_lines():
    bar = progress(total=3, desc="x", file=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    log = io.StringIO()
    with progress(total=3, desc="x", file=log) as lines:
        assert isinstance(lines, LogLines)


def test_lines_at_start_and_end_and_none_between_within_the_interval():
    log = io.StringIO()
    with LogLines(
        total=150, desc="demo grid", unit="cell", initial=30, every_s=3600, file=log
    ) as b:
        for _ in range(90):
            b.update(1)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("demo grid: 30/150 cells (20%), elapsed 0:00")
    assert lines[1].startswith("demo grid: 120/150 cells (80%), elapsed 0:00, ETA 0:00")
    assert len(lines) == 2


def test_a_step_longer_than_the_interval_still_prints_from_the_timer():
    log = io.StringIO()
    bar = LogLines(total=4, desc="pretrain", unit="epoch", every_s=0.2, file=log)
    time.sleep(0.75)  # one long step: no update at all
    bar.close()
    lines = log.getvalue().splitlines()
    timed = [line for line in lines if line.startswith("pretrain: 0/4 epochs (0%), elapsed 0:0")]
    assert len(timed) >= 3, lines  # the start line, then one per 0.2 s, then the end line


def test_eta_counts_only_the_work_done_in_this_run():
    log = io.StringIO()
    bar = LogLines(total=10, desc="g", unit="cell", initial=5, every_s=0.0, file=log)
    bar._t0 -= 60  # 60 s for one fresh cell: 4 to go take 4 minutes (not 60/6 * 4 s)
    bar.update(1)
    bar.close()
    assert "g: 6/10 cells (60%), elapsed 1:00, ETA 4:00" in log.getvalue()


def test_an_inner_loop_logs_only_timed_lines_with_its_postfix():
    log = io.StringIO()
    bar = progress(total=8, desc="batches", unit="batch", leave=False, every_s=0.0, file=log)
    bar.set_postfix(loss=0.5)
    bar.close()
    lines = log.getvalue().splitlines()  # no start or end line; the timer may add timed ones
    assert lines and set(lines) == {"batches: 0/8 batches (0%), elapsed 0:00, loss=0.5"}


def test_clock():
    assert (_clock(5), _clock(65), _clock(3725)) == ("0:05", "1:05", "1:02:05")
