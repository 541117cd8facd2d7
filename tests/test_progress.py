"""common.progress: tqdm on a terminal, whole lines (no carriage return) in a log file."""
import io

import pytest
from tqdm import tqdm

from common import progress
from common.progress import LineProgress, interval_seconds, progress_bar


class Clock:
    """A fake monotonic clock: ``advance(seconds)`` moves it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class TtyStream(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress, "_clock", fake)
    return fake


def lines_of(stream):
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.endswith("\n")
    return text.splitlines()


def test_log_gets_start_periodic_and_end_lines(clock):
    stream = io.StringIO()
    with progress_bar(total=24000, initial=1200, desc="pretrain", unit="it", dynamic_ncols=True,
                      file=stream, interval=30) as bar:
        assert isinstance(bar, LineProgress) and isinstance(bar, tqdm)
        for _ in range(800):  # 8 it/s for 100 s: lines at 30, 60, 90 s
            clock.advance(0.125)
            bar.update(1)
            bar.set_postfix(loss=5.123, lr=1.2e-3)
    lines = lines_of(stream)
    assert lines[0] == "pretrain: 1200/24000 it (5%), started"
    periodic = lines[1:-1]
    assert len(periodic) == 3
    assert periodic[0] == "pretrain: 1440/24000 it (6%), 8.0 it/s, elapsed 00:30, eta 47:00, loss=5.12 lr=0.0012"
    assert lines[-1] == "pretrain: 2000/24000 it (8%), 8.0 it/s, elapsed 01:40, stopped, loss=5.12 lr=0.0012"
    assert bar.n == 2000


def test_lines_respect_the_interval(clock):
    stream = io.StringIO()
    bar = progress_bar(total=100, desc="davis", unit="frame", file=stream, interval=30)
    for _ in range(100):
        clock.advance(1.0)  # 100 s in all, updates and postfix changes every second
        bar.update()
        bar.set_postfix_str("bear")
    bar.close()
    lines = lines_of(stream)
    assert len(lines) == 1 + 3 + 1  # start, at 30/60/90 s, end
    assert [line.split(",")[0] for line in lines] == ["davis: 0/100 frame (0%)", "davis: 30/100 frame (30%)",
                                                      "davis: 60/100 frame (60%)", "davis: 90/100 frame (90%)",
                                                      "davis: 100/100 frame (100%)"]
    assert lines[-1] == "davis: 100/100 frame (100%), 1.0 frame/s, elapsed 01:40, done, bear"
    bar.close()  # closing twice writes nothing more
    assert len(lines_of(stream)) == 5


def test_iteration_and_interval_from_environment(clock, monkeypatch):
    monkeypatch.setenv("DINO_PROGRESS_SECONDS", "5")
    assert interval_seconds() == 5.0
    stream = io.StringIO()
    seen = []
    for item in progress_bar(iter(range(20)), desc="attention figures", unit="img", file=stream):
        seen.append(item)
        clock.advance(1.0)
    assert seen == list(range(20))
    lines = lines_of(stream)
    assert lines[0] == "attention figures: 0 img, started"
    assert [line.split(",")[0] for line in lines[1:]] == [f"attention figures: {n} img" for n in (5, 10, 15, 20, 20)]
    assert lines[-1].endswith("done")


def test_bad_interval_variable_gives_the_default(monkeypatch, capsys):
    monkeypatch.setenv("DINO_PROGRESS_SECONDS", "soon")
    assert interval_seconds() == progress.DEFAULT_SECONDS
    assert "DINO_PROGRESS_SECONDS" in capsys.readouterr().err


def test_write_goes_out_as_its_own_line(clock):
    stream = io.StringIO()
    with progress_bar(total=10, desc="knn", file=stream, interval=30) as bar:
        bar.update(3)
        progress.write("warning: something happened", file=stream)
        bar.write("note: another message", file=stream)
        clock.advance(31)
        bar.update(3)
    lines = lines_of(stream)
    assert lines[1:3] == ["warning: something happened", "note: another message"]
    assert lines[3].startswith("knn: 6/10 it (60%)")
    assert len(lines) == 5


def test_transient_bar_is_silent_when_short(clock):
    stream = io.StringIO()
    for _ in progress_bar(range(50), desc="epoch 0 crops", leave=False, file=stream, interval=30):
        clock.advance(0.1)
    assert stream.getvalue() == ""
    for _ in progress_bar(range(50), desc="epoch 1 crops", leave=False, file=stream, interval=30):
        clock.advance(1.0)
    lines = lines_of(stream)
    assert [line.split(",")[0] for line in lines] == ["epoch 1 crops: 30/50 it (60%)", "epoch 1 crops: 50/50 it (100%)"]


def test_disabled_bar_writes_nothing():
    stream = io.StringIO()
    with progress_bar(total=5, desc="x", disable=True, file=stream) as bar:
        bar.update(2)
        bar.set_postfix(loss=1.0)
    assert stream.getvalue() == ""
    assert list(progress_bar(range(3), disable=True, file=stream)) == [0, 1, 2]
    assert stream.getvalue() == ""


def test_terminal_gets_a_tqdm_bar():
    stream = TtyStream()
    with progress_bar(total=10, desc="voc attention", unit="img", file=stream, mininterval=0) as bar:
        assert type(bar) is tqdm
        bar.update(4)
    text = stream.getvalue()
    assert "\r" in text  # redrawn in place
    assert "voc attention" in text and "4/10" in text


def test_default_stream_is_stderr_at_call_time(clock, capsys):
    with progress_bar(total=2, desc="features") as bar:  # pytest's captured stderr is not a terminal
        bar.update(2)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[0] == "features: 0/2 it (0%), started"
    assert err.splitlines()[-1].startswith("features: 2/2 it (100%)")
