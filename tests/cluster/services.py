"""Throwaway servers on loopback for the slow tests: a single-node SLURM cluster (setup_slurm.sh), PostgreSQL from
the machine's binaries (a temp data dir, a free port), and an MLflow tracking server backed by that PostgreSQL with
its own artifact root. Each skips the test with the reason where it cannot run here."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SETUP_SLURM = Path(__file__).with_name("setup_slurm.sh")


def slurm_cluster() -> None:
    """Install (apt) and start the single-node cluster with accounting, idempotently; skip where it cannot be."""
    if shutil.which("sinfo") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("no SLURM here, and installing it needs root and apt-get (see tests/cluster/setup_slurm.sh)")
    proc = subprocess.run(["bash", SETUP_SLURM], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"SLURM cannot be set up here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"setup_slurm.sh failed:\n{proc.stderr[-3000:]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@contextmanager
def postgres(*databases: str) -> Iterator[str]:
    """A PostgreSQL server with `databases` that asks for a password (scram-sha-256, as a real server does), so a
    secret that fails to reach a job fails the test; yields its URL with that password and without a database
    (`postgresql+psycopg://postgres:<password>@localhost:port`)."""
    pytest.importorskip("psycopg")
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses root
    data = Path(tempfile.mkdtemp(prefix="test-pg-"))
    password = f"pw{secrets.token_hex(12)}"
    pwfile = data / "pwfile"
    pwfile.write_text(password + "\n")
    if as_postgres:
        shutil.chown(data, "postgres")
        shutil.chown(pwfile, "postgres")
    cluster = data / "cluster"
    port = free_port()
    pg = bins[-1].parent
    init = [pg / "initdb", "-D", cluster, "-A", "scram-sha-256", f"--pwfile={pwfile}", "-U", "postgres"]
    subprocess.run([*as_postgres, *init], check=True, capture_output=True)
    server = ["-D", cluster, "-o", f"-p {port} -k {data} -c listen_addresses=localhost", "-l", data / "log"]
    subprocess.run([*as_postgres, pg / "pg_ctl", *server, "-w", "start"], check=True, capture_output=True)
    env = {**os.environ, "PGPASSWORD": password}
    try:
        for db in databases:
            subprocess.run(
                [pg / "createdb", "-h", "localhost", "-p", str(port), "-U", "postgres", db], check=True, env=env
            )
        yield f"postgresql+psycopg://postgres:{password}@localhost:{port}"
    finally:
        subprocess.run([*as_postgres, pg / "pg_ctl", "-D", cluster, "-m", "immediate", "stop"], check=False)
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def mlflow_server(backend_store: str, artifacts: Path, timeout: float = 180) -> Iterator[str]:
    """`mlflow server` on a free loopback port, runs in `backend_store`, artifacts proxied into `artifacts`."""
    port = free_port()
    log = open(artifacts.parent / "mlflow-server.log", "w")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", backend_store, "--artifacts-destination", str(artifacts)]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, (artifacts.parent / "mlflow-server.log").read_text()[-3000:]
                assert time.time() < deadline, "the MLflow server did not answer in time"
                time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, 15)  # the server and its workers: its own process group
        server.wait(timeout=30)
        log.close()
