"""Real servers for tests, on loopback only: an MLflow tracking server and a PostgreSQL cluster."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, admin_password: str | None = None) -> Iterator[str]:
    """`mlflow server --workers 1` on 127.0.0.1 (the default four workers take 1.3 GB); stopped by PID.
    With `admin_password`: MLflow's basic-auth app, its user database beside the artifacts. A free port can be
    taken between the check and the server's bind: a server that exits at once is started again on another."""
    env = dict(os.environ)
    args = []
    if admin_password:
        config = artifacts.parent / "basic_auth.ini"
        # auth_cache_ttl_seconds: MLflow's cache of accepted passwords; without it every request of a training
        # pays the deliberately slow password hash again (about a second each on these 2 cores)
        config.write_text("[mlflow]\ndefault_permission = READ\n"
                          f"database_uri = sqlite:///{artifacts.parent / 'auth.db'}\nadmin_username = admin\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                          "auth_cache_ttl_seconds = 60\n")
        args = ["--app-name", "basic-auth"]
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    for attempt in range(3):
        port = free_port()
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend_uri,
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", *args]
        log_path = artifacts.parent / f"mlflow-server-{port}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                if proc.poll() is not None:
                    break
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{url}/health", timeout=2).ok:
                        break
                time.sleep(0.5)
            else:
                raise RuntimeError("mlflow server did not answer /health within 120 s")
            if proc.poll() is not None:
                if attempt < 2 and "address already in use" in log_path.read_text().lower():
                    continue  # the port was taken meanwhile: another one
                raise RuntimeError(f"mlflow server exited: {log_path.read_text()[-2000:]}")
            yield url
            return
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a loopback port; yields a SQLAlchemy URL to database `mlflow`."""
    bindir = postgres_bin()
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the account Debian's package made
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
