"""Start ``hf-secure serve`` as a child process and wait until it answers (demo, tests, benchmarks)."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import httpx

from ..errors import ServerError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(folder: str, port: int | None = None, args: tuple[str, ...] = (), startup_timeout_s: float = 120.0,
           env: dict | None = None, ca_bundle: str | None = None):
    """Yield ``(process, url)`` of ``hf-secure serve folder ... args`` on loopback; stop it on exit.
    ``process.read_log()`` returns what the server printed so far.

    ``args`` are further ``serve`` options (``--ssl-certfile`` makes the URL https; ``ca_bundle``
    then verifies it while waiting for ``/healthz``). Stopping sends SIGTERM (graceful shutdown),
    then SIGKILL after 10 s. Raises ServerError when the server exits or stays silent on start.
    """
    port = port or free_port()
    scheme = "https" if "--ssl-certfile" in args else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "hf_secure.cli", "serve", str(folder), "--port", str(port), *args]
    verify = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, text=True)

    def read_log() -> str:
        log.seek(0)
        return log.read()

    proc.read_log = read_log  # what the server printed so far
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise ServerError(f"server exited with code {proc.returncode}: {read_log()[-2000:]}")
            try:
                httpx.get(url + "/healthz", timeout=1.0, verify=verify).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise ServerError(f"server did not answer within {startup_timeout_s} s") from None
                time.sleep(0.2)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
