"""anomaly.progress: bars on a terminal, plain lines in logs, silence under -q, and chunked
scoring that changes no result."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly import progress


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    yield
    progress.set_verbosity(progress.NORMAL)


def test_plain_lines_when_stderr_is_not_a_terminal(capsys):
    with progress.progress("Scoring", total=3) as p:
        for _ in range(3):
            p.update()
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == ""
    assert lines[0].startswith("Scoring: 1/3 images (33%)")
    assert lines[-1].startswith("Scoring: 3/3 images (100%) in ")
    assert "\r" not in err and "\x1b" not in err  # a log gets no terminal control codes


def test_quiet_prints_nothing(capsys):
    progress.set_verbosity(progress.QUIET)
    with progress.progress("Scoring", total=2) as p:
        p.update(2)
    with progress.step("Writing"):
        pass
    progress.status("hello")
    assert capsys.readouterr() == ("", "")


def test_a_bar_on_a_terminal_goes_to_stderr(capsys, monkeypatch):
    monkeypatch.setattr(progress, "is_tty", lambda: True)
    with progress.progress("Downloading", total=10, unit="MB") as p:
        p.update(5)
        assert p._bar is not None  # rich is drawing
        p.update(5)
    out, err = capsys.readouterr()
    assert out == "" and "Downloading: 10/10 MB (100%) in" in err


def test_quick_steps_stay_silent(capsys, monkeypatch):
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 60.0)
    with progress.progress("Scoring", total=2) as p:
        p.update(2)
    with progress.step("Writing"):
        pass
    assert capsys.readouterr().err == ""


def test_in_chunks_is_the_same_as_one_call(monkeypatch, capsys):
    monkeypatch.setattr(progress, "CHUNK", 4)
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    calls = []

    def fn(a):
        calls.append(len(a))
        return a.sum(axis=1)

    np.testing.assert_array_equal(progress.in_chunks(fn, x, "Scoring"), x.sum(axis=1))
    assert calls == [4, 4, 2]
    assert "Scoring: 10/10 images (100%)" in capsys.readouterr().err
