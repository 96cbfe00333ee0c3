"""The tests' own command runner (commands.run_command)."""

import sys
import time
from pathlib import Path

import pytest

from commands import run_command


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" in status.read_text()


def test_a_command_past_its_time_fails_the_test_with_its_stacks_and_leaves_no_process():
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              "print(child.pid, flush=True)\n"
              "def waiting_here():\n"
              "    time.sleep(120)\n"
              "waiting_here()\n")
    with pytest.raises(pytest.fail.Exception) as failed:
        run_command([sys.executable, "-c", script], timeout=5)
    message = str(failed.value)
    assert "still ran after 5 s" in message and "in waiting_here" in message, message  # faulthandler's stack
    child = int(message.split("its output:\n")[1].split()[0])  # what it printed
    deadline = time.time() + 10
    while not _gone(child) and time.time() < deadline:
        time.sleep(0.1)
    assert _gone(child)


def test_a_command_in_time_is_run_as_given():
    done = run_command([sys.executable, "-c", "import os, sys; print(os.environ['X']); sys.exit(3)"], timeout=60,
                       env={"X": "given"})
    assert (done.returncode, done.stdout) == (3, "given\n")
