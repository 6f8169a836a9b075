"""The gateway's container image, built with podman (`make image` runs this; so does
tests/integration/test_image.py, which then starts it).

    python tools/image.py [--tag localhost/ltrec-gateway:dev] [--base IMAGE]

Three steps, each skipped when its result is already there, so a second build costs seconds:

1. Wheels: every pin of requirements/base.txt (and grpcio-tools, pinned in requirements/dev.txt,
   for the stubs) is downloaded on the host into build/wheels/; the image installs only those
   (`pip install --no-index`), so the build reaches no package index.
2. The base: `--base` if given; else the public python:3.11-slim if present or pullable; else a
   base made here from Debian bookworm's packages (mmdebstrap, then `podman import`), kept in
   podman's store as localhost/debian-python:bookworm (`podman rmi` it to remake it).
3. `podman build` of docker/gateway.Dockerfile, whose layers podman caches.

Anything missing (podman, runc, mmdebstrap: `make install` installs them as root) or failing
raises `ImageBuildError` with the reason; the command exits 1 with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "gateway.Dockerfile"
IGNOREFILE = ROOT / "docker" / "gateway.Dockerfile.dockerignore"
WHEELS = ROOT / "build" / "wheels"
# What the wheels in WHEELS were downloaded for; another spec downloads them again.
WHEELS_SPEC = WHEELS / ".spec"

IMAGE = "localhost/ltrec-gateway:dev"
# The Dockerfile's default base, fully qualified (podman may refuse short names).
PUBLIC_BASE = "docker.io/library/python:3.11-slim"
LOCAL_BASE = "localhost/debian-python:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# `build` and `run` both need these where the sandbox refuses podman's default rlimits and its
# cgroup v2 mode (crun); with host networking a container reaches Triton on the host's loopback.
PODMAN_FLAGS = (
    "--runtime",
    "runc",
    "--network",
    "host",
    "--ulimit",
    "nofile=1024:4096",
    "--ulimit",
    "nproc=1024:4096",
)
# The build context besides build/wheels/: what docker/gateway.Dockerfile.dockerignore admits
# (tests/unit/test_image_build.py keeps the two in step).
CONTEXT = ("requirements/base.txt", "proto", "ltrec_core", "server")
CONTEXT_SKIPPED = ("server/gen/",)
# The image's label holding the digest of what it was built from (`inputs_digest`).
INPUTS_LABEL = "org.ltrec.build-inputs"
PULL_TIMEOUT_SECONDS = 120
# The tail of a failed command's output kept in the error.
ERROR_TAIL_CHARS = 3000


class ImageBuildError(RuntimeError):
    """The image cannot be built here; the message says why."""


@dataclass(frozen=True)
class Built:
    tag: str
    base: str
    image_id: str
    size_bytes: int
    reused: bool  # the tag was already built from the same inputs: no build ran


def _run(command: list[str], *, stream: bool = False, timeout_s: float | None = None) -> str:
    """Runs `command`; its output is returned (or shown as it comes when `stream`). A failure
    raises `ImageBuildError` naming the command, with the output's tail."""
    try:
        done = subprocess.run(
            command,
            stdout=None if stream else subprocess.PIPE,
            stderr=None if stream else subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError as err:
        raise ImageBuildError(f"{command[0]} is not installed") from err
    except subprocess.TimeoutExpired as err:
        raise ImageBuildError(f"`{' '.join(command)}` took more than {timeout_s} s") from err
    if done.returncode != 0:
        tail = "(output above)" if stream else (done.stdout or "")[-ERROR_TAIL_CHARS:]
        raise ImageBuildError(
            f"`{' '.join(command)}` exited with code {done.returncode}: {tail.strip()}"
        )
    return done.stdout or ""


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise ImageBuildError(
            f"{', '.join(missing)} not installed: `make install` installs podman, runc and "
            "mmdebstrap as root (apt-get install -y podman runc mmdebstrap)"
        )


def wheel_requirements() -> list[str]:
    """The pins to download: base.txt's without their markers (the image's Python may be an
    older 3.11 than the host's, e.g. bookworm's 3.11.2, whose markers differ; the image's pip
    evaluates them), and dev.txt's grpcio-tools."""
    pins = []
    for line in (ROOT / "requirements" / "base.txt").read_text().splitlines():
        pin = line.split("#", 1)[0].split(";", 1)[0].strip()
        if pin:
            pins.append(pin)
    dev = (ROOT / "requirements" / "dev.txt").read_text().splitlines()
    pins += [line.split("#", 1)[0].strip() for line in dev if line.startswith("grpcio-tools==")]
    return pins


def download_wheels(stream: bool = False) -> Path:
    """build/wheels/ holding binary wheels of `wheel_requirements()` and their dependencies,
    downloaded with the host's pip and its configured indexes."""
    pins = wheel_requirements()
    spec = "\n".join([f"python {sys.version_info.major}.{sys.version_info.minor}", *pins]) + "\n"
    if WHEELS_SPEC.is_file() and WHEELS_SPEC.read_text() == spec:
        return WHEELS
    WHEELS.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WHEELS.parent, prefix=".wheels-"))
    try:
        _run(
            [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(tmp)]
            + pins,
            stream=stream,
        )
        (tmp / WHEELS_SPEC.name).write_text(spec)
        shutil.rmtree(WHEELS, ignore_errors=True)
        tmp.rename(WHEELS)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return WHEELS


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], check=False).returncode == 0


def local_base(stream: bool = False) -> str:
    """LOCAL_BASE, made from Debian packages unless podman already has it."""
    if image_exists(LOCAL_BASE):
        return LOCAL_BASE
    require("mmdebstrap")
    with tempfile.TemporaryDirectory(dir=ROOT / "build", prefix=".base-") as tmp:
        tar = Path(tmp) / f"debian-python-{DEBIAN_SUITE}.tar"
        _run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                f"--include={','.join(DEBIAN_PACKAGES)}",
                # Documentation, manuals and translations: nothing in a container reads them.
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                "--dpkgopt=path-exclude=/usr/share/info/*",
                DEBIAN_SUITE,
                str(tar),
            ],
            stream=stream,
        )
        _run(["podman", "import", "--quiet", str(tar), LOCAL_BASE], stream=stream)
    return LOCAL_BASE


def choose_base(stream: bool = False) -> str:
    """The public base if podman has it or can pull it, else the local one."""
    if image_exists(PUBLIC_BASE):
        return PUBLIC_BASE
    try:
        _run(["podman", "pull", "--quiet", PUBLIC_BASE], timeout_s=PULL_TIMEOUT_SECONDS)
        return PUBLIC_BASE
    except ImageBuildError as err:
        reason = str(err).split(": ", 1)[-1].strip()
        print(f"{PUBLIC_BASE} cannot be pulled ({reason}): using {LOCAL_BASE}", file=sys.stderr)
    return local_base(stream)


def inspect(name: str, template: str) -> str:
    return _run(["podman", "image", "inspect", "--format", template, name]).strip()


def built_from(tag: str) -> str | None:
    """The inputs digest `build` labelled the image `tag` with (None: not built by it)."""
    labels = json.loads(inspect(tag, "{{json .Labels}}") or "null") or {}
    return labels.get(INPUTS_LABEL)


def context_files() -> list[Path]:
    files = []
    for entry in CONTEXT:
        path = ROOT / entry
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            relative = file.relative_to(ROOT).as_posix()
            if (
                file.is_file()
                and "__pycache__" not in file.parts
                and not relative.startswith(CONTEXT_SKIPPED)
            ):
                files.append(file)
    return files


def inputs_digest(base_id: str) -> str:
    """What the image is built from: the base's id, the Dockerfile and its ignore file, the
    wheels' spec and the build context's files (names and bytes). A file not there yet (the
    wheels' spec before the first download) counts as absent."""
    digest = hashlib.sha256(f"base {base_id}\n".encode())
    for file in [DOCKERFILE, IGNOREFILE, WHEELS_SPEC, *context_files()]:
        digest.update(f"{file.relative_to(ROOT).as_posix()}\n".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest() if file.exists() else b"absent")
    return digest.hexdigest()


def build(tag: str = IMAGE, base: str | None = None, stream: bool = False) -> Built:
    """The gateway image `tag`, built unless podman has it built from the same inputs: podman's
    own layer cache still hashes every layer's content, about a minute on two busy cores."""
    require("podman", "runc")
    (ROOT / "build").mkdir(exist_ok=True)
    download_wheels(stream)
    chosen = base or choose_base(stream)
    digest = inputs_digest(inspect(chosen, "{{.Id}}"))
    reused = image_exists(tag) and built_from(tag) == digest
    if not reused:
        _run(
            [
                "podman",
                "build",
                *PODMAN_FLAGS,
                "--layers",
                "--file",
                str(DOCKERFILE),
                "--ignorefile",
                str(IGNOREFILE),
                "--build-arg",
                f"BASE={chosen}",
                "--label",
                f"{INPUTS_LABEL}={digest}",
                "--tag",
                tag,
                str(ROOT),
            ],
            stream=stream,
        )
    return Built(
        tag,
        chosen,
        inspect(tag, "{{.Id}}"),
        int(inspect(tag, "{{.Size}}")),
        reused,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=IMAGE)
    parser.add_argument("--base", help=f"base image (default: {PUBLIC_BASE} or {LOCAL_BASE})")
    args = parser.parse_args(argv)
    try:
        built = build(args.tag, args.base, stream=True)
    except ImageBuildError as err:
        print(f"image: {err}", file=sys.stderr)
        return 1
    state = "up to date" if built.reused else "built"
    print(
        f"{built.tag} ({built.image_id[:12]}, {state}) on {built.base}: "
        f"{built.size_bytes / 1e6:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
