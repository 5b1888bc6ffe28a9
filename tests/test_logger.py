"""Progress output: one line rewritten in place on a terminal, a log line each time elsewhere."""
import io
import logging

from jaxgen.train import logger as logger_lib


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_rewrites_one_line_on_a_terminal(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(logger_lib.sys, "stderr", term)
    shown = logger_lib.Progress("sample", 4)
    for done in (1, 2, 3, 4):
        shown.update(done)
    out = term.getvalue()
    assert out.count("\r\033[K") == 4 and out.count("\n") == 1 and out.endswith("\n")  # one line, ended once
    assert "[sample] 4/4 images (100%)" in out and "images/s | ETA" in out


def test_progress_is_a_log_line_each_time_elsewhere(monkeypatch, caplog):
    monkeypatch.setattr(logger_lib.sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO):
        shown = logger_lib.Progress("cache kl_vae codes", 10)
        shown.update(5)
        shown.update(10)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("[cache kl_vae codes] 5/10 images (50%)") and "10/10 images (100%)" in lines[1]
