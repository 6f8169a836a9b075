"""tools/image.py and docker/gateway.Dockerfile agree: the build context the ignore file admits is
the one whose digest decides a rebuild, the wheels cover every pin whatever its marker, and the
Dockerfile keeps the public base as its default and a non-root user."""

from __future__ import annotations

import re

from tools import image


def admitted() -> set[str]:
    lines = image.IGNOREFILE.read_text().splitlines()
    return {line[1:].rstrip("/") for line in lines if line.startswith("!")}


def test_the_digest_covers_what_the_ignore_file_admits() -> None:
    assert admitted() == {*image.CONTEXT, image.WHEELS.relative_to(image.ROOT).as_posix()}
    excluded = {line.rstrip("/") for line in image.IGNOREFILE.read_text().splitlines()}
    assert {s.rstrip("/") for s in image.CONTEXT_SKIPPED} <= excluded


def test_the_digest_changes_with_the_source_and_the_base() -> None:
    files = {f.relative_to(image.ROOT).as_posix() for f in image.context_files()}
    assert "server/app.py" in files and "proto/ltrec/v1/recommender.proto" in files
    assert not any(f.startswith("server/gen/") or "__pycache__" in f for f in files)
    assert image.inputs_digest("sha256:a") != image.inputs_digest("sha256:b")


def test_wheels_cover_every_pin_without_markers() -> None:
    pins = image.wheel_requirements()
    assert all(";" not in pin and "#" not in pin and pin == pin.strip() for pin in pins)
    names = {re.split(r"[\[<>=!~]", pin, maxsplit=1)[0] for pin in pins}
    # async-timeout's marker is false on the host's Python but true on bookworm's 3.11.2.
    assert {"grpcio", "redis", "async-timeout", "grpcio-tools"} <= names
    assert not names & {"torch", "onnxruntime", "pandas", "transformers"}


def test_dockerfile_defaults_to_the_public_base_and_a_non_root_user() -> None:
    text = image.DOCKERFILE.read_text()
    assert "ARG BASE=python:3.11-slim\n" in text
    assert image.PUBLIC_BASE.endswith("/python:3.11-slim")
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "--no-index" in text
