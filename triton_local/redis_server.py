"""A local `redis-server` (Debian's package, which `make install` provides) for the gateway's
shared history store: started by `python -m triton_local.stack --history-redis` and by the tests.

It binds 127.0.0.1 only, keeps nothing on disk unless given a directory to save in, and is
stopped by its own pid.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

from triton_local.server import free_ports

INSTALL_HINT = "redis-server is not installed: run `make install` (apt-get install redis-server)"


class RedisServerError(RuntimeError):
    """redis-server is missing, exited, or did not answer in time."""


class RedisServer:
    def __init__(
        self,
        *,
        port: int = 0,
        password: str = "",
        data_dir: Path | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.port = port or free_ports(1)[0]
        self.password = password
        self.data_dir = data_dir
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def command(self, binary: str) -> list[str]:
        command = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--daemonize", "no"]
        command += ["--protected-mode", "yes", "--appendonly", "no"]
        if self.data_dir is None:
            command += ["--save", ""]
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            command += ["--dir", str(self.data_dir), "--save", "60 1"]
        if self.password:
            command += ["--requirepass", self.password]
        return command

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(INSTALL_HINT)
        with contextlib.ExitStack() as files:
            out = (
                files.enter_context(self.log_path.open("ab"))
                if self.log_path
                else subprocess.DEVNULL
            )
            self._process = subprocess.Popen(
                self.command(binary),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Until it answers PING (or, with a password, asks for one); fails fast if it exits."""
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise RedisServerError(f"redis-server exited with code {code} on {self.address}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    reply = conn.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(f"redis-server did not answer on {self.address}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def kill(self) -> None:
        """SIGKILL by its pid, as a crash or a lost node would take it (no clean shutdown)."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.kill()
        self._process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
