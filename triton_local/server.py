"""Run the real ``tritonserver`` binary of the ``nvidia-pytriton`` wheel on a CPU-only machine.

The wheel carries the server and its python backend but no onnxruntime backend; the backend
directory built here adds a Python-based backend named ``onnxruntime`` (our
``onnxruntime_backend/model.py``) so that the repository written for the NGC image serves as is.
Why each piece of environment is needed is said where it is set up, below; the README's
"Triton, locally" section has the overview.
"""

from __future__ import annotations

import atexit
import contextlib
import filecmp
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

BACKEND_SOURCE = Path(__file__).resolve().parent / "onnxruntime_backend" / "model.py"
LOG_TAIL_LINES = 40


class TritonServerError(RuntimeError):
    """Triton did not start, exited early, or did not become ready in time."""


def pytriton_root() -> Path:
    """The ``pytriton/tritonserver`` folder of the installed wheel.

    Found without importing ``pytriton``: its Python API is installed without its dependencies.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError("nvidia-pytriton is not installed in this interpreter")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"no tritonserver binary under {root}")
    return root


def _bundled_libs_dir(root: Path) -> Path:
    return root.parent.parent / "nvidia_pytriton.libs"


def _copy_if_changed(source: Path, target: Path) -> None:
    """Copies by rename so that a server already running from ``target`` keeps its old file."""
    if target.is_file() and not target.is_symlink() and filecmp.cmp(source, target, shallow=False):
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copy2(source, tmp)
    os.replace(tmp, target)


def _symlink(source: Path, target: Path) -> None:
    if target.is_symlink() and Path(os.readlink(target)) == source:
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(source)
    os.replace(tmp, target)


def prepare_backend_dir(build_dir: Path) -> Path:
    """Builds ``<build_dir>/backends`` for ``--backend-directory`` and returns its path.

    ``python/`` holds real copies of ``libtriton_python.so`` (Triton rejects a symlink that
    "escapes backend directory") and ``triton_python_backend_utils.py``, plus the stub for this
    interpreter's Python version; ``onnxruntime/model.py`` is the Python-based backend. Cheap to
    call again: files are only rewritten when their source changed.
    """
    root = pytriton_root()
    backends = Path(build_dir).resolve() / "backends"
    python_dir = backends / "python"
    ort_dir = backends / "onnxruntime"
    python_dir.mkdir(parents=True, exist_ok=True)
    ort_dir.mkdir(parents=True, exist_ok=True)

    wheel_python = root / "backends" / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _copy_if_changed(wheel_python / name, python_dir / name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"the wheel has no python backend stub for Python {version}")
    _symlink(stub, python_dir / "triton_python_backend_stub")
    _copy_if_changed(BACKEND_SOURCE, ort_dir / "model.py")
    return backends


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1; held open together so that none is handed out twice."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


_RUNNING: weakref.WeakSet[TritonServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """The server lives in its own session, so nothing else stops it when Python exits."""
    for server in list(_RUNNING):
        server.stop()


class TritonServer:
    """One ``tritonserver`` process on 127.0.0.1; a context manager that starts, waits, stops.

    Ports given as 0 are picked free at ``start()``; the chosen ones are then in ``grpc_port``,
    ``http_port``, ``metrics_port`` and ``grpc_url``.
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        build_dir: Path = Path("build/triton"),
        log_path: Path | None = None,
        model_control_mode: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.build_dir = Path(build_dir).resolve()
        self.log_path = Path(log_path).resolve() if log_path is not None else None
        self.model_control_mode = model_control_mode
        self.extra_args = list(extra_args)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def command(self, backend_dir: Path) -> list[str]:
        args = [
            str(pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            # Stubs name their /dev/shm regions with this prefix: unique per server so that
            # two servers on one machine (parallel tests) never share a region.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix()}",
        ]
        if self.model_control_mode is not None:
            args.append(f"--model-control-mode={self.model_control_mode}")
        return [*args, *self.extra_args]

    def _shm_prefix(self) -> str:
        return f"ltrec_triton_{os.getpid()}_{self.http_port}_"

    def _remove_shm_regions(self) -> None:
        """A stub killed or stopped mid-shutdown can leave its region behind; ours have our
        prefix, so only they are removed, and only once the server has exited."""
        for region in Path("/dev/shm").glob(f"{self._shm_prefix()}*"):
            with contextlib.suppress(OSError):
                region.unlink()

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stub finds its stdlib and site-packages (numpy, onnxruntime) via python3 on PATH.
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join(p for p in (venv_bin, env.get("PATH", "")) if p)
        lib_dirs = [
            sysconfig.get_config_var("LIBDIR") or "",
            str(_bundled_libs_dir(pytriton_root())),
            env.get("LD_LIBRARY_PATH", ""),
        ]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in lib_dirs if p)
        return env

    def start(self) -> None:
        if self.is_running():
            raise TritonServerError(f"tritonserver already running as pid {self.pid}")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"no model repository at {self.model_repository}")
        backend_dir = prepare_backend_dir(self.build_dir)
        wanted = [self.grpc_port, self.http_port, self.metrics_port]
        free = iter(free_ports(wanted.count(0)))
        self.grpc_port, self.http_port, self.metrics_port = (p or next(free) for p in wanted)
        if self.log_path is None:
            self.log_path = self.build_dir / "logs" / f"tritonserver-{self.http_port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

        command = self.command(backend_dir)
        logger.info("starting %s", " ".join(command))
        with self.log_path.open("wb") as log:
            # Its own session: a terminal's ctrl-C reaches only us, and we stop it in order.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        _RUNNING.add(self)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def is_ready(self) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Polls readiness; returns the seconds waited. Raises as soon as the process exits."""
        if self._process is None:
            raise TritonServerError("tritonserver was not started")
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {code} before it was ready; "
                    f"log {self.log_path}:\n{self._tail()}"
                )
            if self.is_ready():
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout_s:.0f} s; "
                    f"log {self.log_path}:\n{self._tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL to its process group (its stubs) if it does not exit in time.

        Returns the exit code, or None when it was never started.
        """
        process = self._process
        if process is None:
            return None
        _RUNNING.discard(self)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver pid %d ignored SIGTERM; killing it", process.pid)
                # The group was created by start_new_session, so its id is our child's pid.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._remove_shm_regions()
        return process.returncode

    def _tail(self) -> str:
        return _log_tail(self.log_path) if self.log_path is not None else "(no log)"

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
