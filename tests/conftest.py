import signal
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _sigint_kept():
    """SIGINT's handler as each test found it (one may install Python's own, which `make &` ignores;
    Lightning ignores SIGINT once it has shut down on a KeyboardInterrupt)."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture(scope="session")
def golden_input():
    return torch.load(FIXTURES / "input.pt", weights_only=True)


def load_golden(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


# --- a real PostgreSQL server for the sweep tests --------------------------------------------------

import glob  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402


def _pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def _install_postgres() -> None:
    """Debian's package, when this machine lacks it (as .ci/run does)."""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], env=env, capture_output=True, timeout=600)


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL URL: $DATLAB_TEST_POSTGRES, or a throw-away server started here."""
    if os.environ.get("DATLAB_TEST_POSTGRES"):
        yield os.environ["DATLAB_TEST_POSTGRES"]
        return
    if _pg_bindir() is None:
        _install_postgres()
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed and could not be installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="datlab-pg-"))  # pytest's tmp dirs are closed to the postgres user
    os.chmod(root, 0o777)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, log = root / "data", root / "log"
    subprocess.run(as_postgres + [f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run(as_postgres + [f"{bindir}/pg_ctl", "-D", str(data), "-l", str(log), "-w", "-o",
                                  f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200",
                                  "start"], check=True, capture_output=True)
    try:
        subprocess.run(as_postgres + [f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                      "datlab"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/datlab"
    finally:
        subprocess.run(as_postgres + [f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
