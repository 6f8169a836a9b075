"""pyproject.toml: a build system, console scripts that resolve to callables, extras that keep
torch out of the gateway, and pins that are those of requirements/*.txt (what `make install`
and CI install)."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "ltrec-gateway": "server.__main__:main",
    "ltrec-train": "ltrec.train:main",
    "ltrec-export": "export_scripts.export:main",
    "ltrec-evaluate": "experiments.report.cli:main",
}
# Never in the gateway's dependencies: its image stays small (STYLE.md).
MODELLING = {"torch", "transformers", "onnx", "onnxruntime", "onnxscript", "pandas", "matplotlib"}


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def requirement_lines(name: str) -> list[str]:
    """The pins of requirements/<name>, without comments and `-r` includes."""
    lines = []
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def dist_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_build_system_is_setuptools(project: dict[str, Any]) -> None:
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    assert any(r.startswith("setuptools") for r in project["build-system"]["requires"])
    meta = project["project"]
    assert meta["name"] == "ltrec" and meta["version"] and meta["requires-python"]


def test_console_scripts_are_importable_callables(project: dict[str, Any]) -> None:
    scripts = project["project"]["scripts"]
    assert scripts == SCRIPTS
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    for target in scripts.values():
        module_name, _, attribute = target.partition(":")
        assert f"{module_name.split('.')[0]}*" in packages, f"{module_name} is not packaged"
        function = getattr(importlib.import_module(module_name), attribute)
        assert callable(function), target


def test_gateway_dependencies_have_no_torch(project: dict[str, Any]) -> None:
    core = {dist_name(r) for r in project["project"]["dependencies"]}
    assert not core & MODELLING, core & MODELLING
    train = {dist_name(r) for r in project["project"]["optional-dependencies"]["train"]}
    assert {"torch", "onnxruntime"} <= train


def test_pins_are_those_of_the_requirements_files(project: dict[str, Any]) -> None:
    """base.txt is the gateway's runtime: the dependencies; dev.txt adds train and dev."""
    extras = project["project"]["optional-dependencies"]
    assert project["project"]["dependencies"] == requirement_lines("base.txt")
    assert "ltrec[train]" in extras["dev"]
    extra_pins = [r for r in extras["train"] + extras["dev"] if not r.startswith("ltrec[")]
    assert sorted(extra_pins) == sorted(requirement_lines("dev.txt"))
