"""paramserver.runtime's end of a child with its parent: armed when the variable names the parent,
at once when that parent is already gone (the race of a parent killed before the child set it up)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from paramserver.runtime import PARENT_ENV, child_env

pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")]

ROOT = Path(__file__).resolve().parents[2]
CHILD = ("import os; from paramserver.runtime import exit_with_parent; "
         "print(exit_with_parent(), os.environ.get('PS_PARENT_PID'), flush=True)")


def run_child(parent: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), PARENT_ENV: parent}
    return subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=30)


def test_a_child_of_the_named_parent_is_armed_and_does_not_pass_the_variable_on() -> None:
    proc = run_child(str(os.getpid()))
    assert (proc.returncode, proc.stdout) == (0, "True None\n"), proc.stderr


def test_a_child_whose_parent_is_gone_before_it_armed_stops_at_once() -> None:
    """The parent named is not the child's parent (any more): it died and the child was adopted."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=30)
    proc = run_child(gone.stdout.strip())
    assert proc.returncode == -signal.SIGTERM and proc.stdout == "", proc


def test_without_the_variable_nothing_happens() -> None:
    proc = run_child("")
    assert (proc.returncode, proc.stdout) == (0, "False None\n"), proc.stderr


def test_child_env_names_this_process_from_the_main_thread_only() -> None:
    """The kernel signals when the thread that started the child ends: not from another thread."""
    assert child_env({PARENT_ENV: "1", "A": "b"}) == {PARENT_ENV: str(os.getpid()), "A": "b"}
    seen: list[dict[str, str]] = []
    thread = threading.Thread(target=lambda: seen.append(child_env({PARENT_ENV: "1", "A": "b"})))
    thread.start()
    thread.join(10)
    assert seen == [{"A": "b"}]


@pytest.mark.parametrize(("ignored", "handled"), [
    ((), {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}),
    ((signal.SIGHUP,), {signal.SIGTERM, signal.SIGINT}),  # nohup: its terminal's close is not a stop
    ((signal.SIGINT,), {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}),  # a background job of a shell
])
def test_stop_signals_keep_only_an_ignored_sighup_ignored(ignored: tuple[signal.Signals, ...],
                                                          handled: set[signal.Signals]) -> None:
    # (each signal's start-time disposition set here: a suite run under nohup, or as a background
    # job, passes SIGHUP or SIGINT ignored to its children)
    code = ("import asyncio, signal; from paramserver.runtime import STOP_SIGNALS, on_stop_signals\n"
            "for sig in STOP_SIGNALS: signal.signal(sig, signal.SIG_DFL)\n"
            f"for sig in {[int(s) for s in ignored]}: signal.signal(sig, signal.SIG_IGN)\n"
            "loop = asyncio.new_event_loop(); print(sorted(int(s) for s in on_stop_signals(loop, lambda: None)))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(sorted(int(s) for s in handled))
