"""Running a command in a test: past its time limit, the test fails with where the command's Python
processes were (their stacks), not a bare TimeoutExpired; none of its processes outlives the test."""

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _state(pid: int) -> tuple[str, int] | None:
    """A process's state letter and process group, None once it is gone (Linux's /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "pid (command name)"
    except OSError:
        return None
    return fields[0], int(fields[2])


def _group(group: int) -> list[int]:
    """The live processes of a process group, oldest first (zombies left out)."""
    pids = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [pid for pid in pids if (state := _state(pid)) and state[0] != "Z" and state[1] == group]


def _ended(pid: int, seconds: float) -> None:
    deadline = time.time() + seconds
    while (state := _state(pid)) and state[0] != "Z" and time.time() < deadline:
        time.sleep(0.1)


def _stacks(group: int) -> str:
    """Each process of the group, one at a time, prints its Python stacks and ends (SIGABRT: faulthandler);
    what was running, by command line."""
    running = []
    for pid in _group(group):
        try:
            running.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_text().replace(chr(0), ' ')[:200]}")
            os.kill(pid, signal.SIGABRT)
            _ended(pid, 10)
        except OSError:  # ended meanwhile (ProcessLookupError too)
            continue
    return "\n".join(running)


def run_command(argv: list[str], *, timeout: float, env: dict[str, str] | None = None,
                **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(argv, capture_output=True, text=True) in a process group of its own, waiting for the
    command alone (not for whatever it started and left holding its output). Past `timeout` seconds each
    Python process of the group prints its threads' stacks (faulthandler, on SIGABRT) and the test fails
    showing them; the processes it started (DDP ranks) are killed when it ends, ended or not."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=out, stderr=err, text=True, **kwargs)
        try:
            proc.wait(timeout=timeout)
            late = None
        except subprocess.TimeoutExpired:
            late = _stacks(proc.pid)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # none left
                pass
            proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if late is not None:
        pytest.fail(f"{' '.join(argv)[:300]} still ran after {timeout:.0f} s; its processes:\n{late}\n"
                    f"its output:\n{stdout[-2000:]}\nits errors, then its stacks:\n{stderr[-8000:]}", pytrace=False)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
