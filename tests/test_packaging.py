"""The package as users get it: the wheel holds every subpackage, the editable install maps each
component folder of DESIGN.md §1 into the tomq namespace, and the console script works.

These run the venv's own interpreter in subprocesses whose working directory is not the repository,
so an import can only succeed through the installed package (wheel or editable finder).
"""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

from conftest import require

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = Path(sysconfig.get_path("scripts"))
PYTHON = sys.executable

MODULES = (
    "tomq",
    "tomq.broker",
    "tomq.node",
    "tomq.node.raft",
    "tomq.sensors",
    "tomq.bridge",
    "tomq.cli",
    "tomq.wire",
)

# The folder each package lives in (DESIGN.md §1), written out here rather than read from pyproject.toml,
# so that a wrong package-dir mapping is caught instead of echoed.
DESIGN_FOLDERS = {
    "tomq": "tomq",
    "tomq.broker": "broker",
    "tomq.node": "node",
    "tomq.node.raft": "node/raft",
    "tomq.sensors": "sensors",
    "tomq.bridge": "firmware-bridge",
}
SOURCE_ROOTS = ("tomq", "broker", "node", "sensors", "firmware-bridge")

# Not copied when building the wheel from a scratch copy of the repository.
_BUILD_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".hypothesis", "demo-cluster",
)

_PRINT_FILES = "import importlib, sys\nfor name in sys.argv[1:]:\n    print(name, importlib.import_module(name).__file__)\n"


def _import_files(env: dict[str, str], cwd: Path) -> dict[str, Path]:
    """Import MODULES in a fresh venv interpreter and return where each one was loaded from."""
    result = subprocess.run(
        [PYTHON, "-c", _PRINT_FILES, *MODULES], cwd=cwd, env=env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, f"importing the subpackages failed:\n{result.stderr}"
    files = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    return {name: Path(files[name]).resolve() for name in MODULES}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def _package_name(folder: Path) -> str:
    """The dotted name setuptools gives `folder` by the longest matching [tool.setuptools.package-dir] entry."""
    relative = folder.relative_to(REPO).as_posix()
    best: tuple[str, str] | None = None
    for package, directory in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        directory = directory.rstrip("/")
        if (relative == directory or relative.startswith(directory + "/")) and (
            best is None or len(directory) > len(best[1])
        ):
            best = (package, directory)
    assert best is not None, f"{relative} is under no [tool.setuptools.package-dir] entry"
    package, directory = best
    rest = relative[len(directory):].strip("/")
    return package + ("." + rest.replace("/", ".") if rest else "")


def _package_folders() -> list[Path]:
    folders = []
    for root in SOURCE_ROOTS:
        for init in sorted((REPO / root).rglob("__init__.py")):
            if "__pycache__" not in init.parts:
                folders.append(init.parent)
    return folders


@pytest.mark.slow
def test_wheel_installs_every_subpackage_and_the_console_script(tmp_path: Path) -> None:
    try:
        setuptools_ok = Version(importlib.metadata.version("setuptools")) >= Version("77")
        importlib.metadata.version("wheel")
        importlib.metadata.version("build")
    except importlib.metadata.PackageNotFoundError:
        setuptools_ok = False
    require("setuptools>=77, wheel and build in the venv", setuptools_ok,
            "the wheel is built with --no-isolation; run scripts/bootstrap '[test]'")

    # Build from a scratch copy so the build never writes build/ or *.egg-info into the working tree
    # (other tests and editors may be reading it at the same time).
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=_BUILD_IGNORE)
    dist = tmp_path / "dist"
    built = subprocess.run(
        [PYTHON, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(source)],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert built.returncode == 0, f"building the wheel failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    (wheel,) = dist.glob("tomq-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points_file,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(entry_points_file).decode())
    assert entry_points.has_section("console_scripts")
    assert entry_points["console_scripts"].get("tomq", "").strip() == "tomq.cli:main"

    # Every Python file of every package folder is in the wheel, under its mapped name.
    expected = set()
    for folder in _package_folders():
        prefix = _package_name(folder).replace(".", "/")
        expected |= {f"{prefix}/{py.name}" for py in folder.glob("*.py")}
    missing = sorted(expected - names)
    assert not missing, f"source files missing from the wheel: {missing}"

    site = tmp_path / "site"
    installed = subprocess.run(
        [PYTHON, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "--quiet",
         "--target", str(site), str(wheel)],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert installed.returncode == 0, f"pip install of the wheel failed:\n{installed.stderr}"

    files = _import_files(_clean_env(PYTHONPATH=str(site)), cwd=tmp_path)
    site = site.resolve()
    for name, file in files.items():
        assert file.is_relative_to(site), f"{name} was imported from {file}, not from the installed wheel in {site}"


def test_editable_install_maps_each_package_to_its_design_folder(tmp_path: Path) -> None:
    files = _import_files(_clean_env(), cwd=tmp_path)
    for name, file in files.items():
        package = name if name in DESIGN_FOLDERS else name.rpartition(".")[0]
        folder = (REPO / DESIGN_FOLDERS[package]).resolve()
        assert file.parent == folder, f"{name} was imported from {file}, expected a file in {folder}"
    # pyproject.toml maps the same packages to the same folders.
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for package, design_folder in DESIGN_FOLDERS.items():
        assert (REPO / package_dir.get(package, "")).resolve() == (REPO / design_folder).resolve(), package


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {_package_name(folder): folder for folder in _package_folders()}
    unlisted = {name: str(folder.relative_to(REPO)) for name, folder in found.items() if name not in listed}
    assert not unlisted, f"package folders not in [tool.setuptools] packages, so missing from the wheel: {unlisted}"
    # And the reverse: nothing listed that has no folder with an __init__.py.
    assert not listed - set(found), f"listed packages with no folder: {sorted(listed - set(found))}"


def test_console_script_help_and_version(tmp_path: Path) -> None:
    script = SCRIPTS / "tomq"
    assert script.exists(), f"no console script at {script}"
    helped = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0, helped.stderr
    assert "init" in helped.stdout
    versioned = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert versioned.returncode == 0, versioned.stderr
    assert versioned.stdout.split() == ["tomq", PYPROJECT["project"]["version"]]
