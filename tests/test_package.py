"""The project installs as a package (pyproject.toml): a wheel holds every module and the pins."""
import email.parser
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("instructjax", "experiments")
# What the build reads; copied so that setuptools' build/ and *.egg-info land in tmp_path, not in
# the checkout (where other test runs and people work).
BUILD_INPUTS = ("pyproject.toml", "requirements.txt", "README.md", *PACKAGES)


def _offline_wheel_build_available() -> bool:
  # --no-build-isolation builds with what is installed: pip, and setuptools with its own
  # bdist_wheel (70.1+) or the separate `wheel` package. Probed in a child process, as pip's
  # build runs: importing setuptools here would clash with the distutils jax's deps loaded.
  probe = ("import setuptools, sys, importlib.util as u; sys.exit(0 if u.find_spec('pip') and ("
           "u.find_spec('setuptools.command.bdist_wheel') or u.find_spec('wheel')) else 1)")
  return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def _copy_build_inputs(dest: pathlib.Path) -> None:
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  dest.mkdir()
  for name in BUILD_INPUTS:
    source = ROOT / name
    if source.is_dir():
      shutil.copytree(source, dest / name, ignore=ignore)
    else:
      shutil.copy2(source, dest / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
  if not _offline_wheel_build_available():
    pytest.skip("pip/setuptools (with bdist_wheel) are not installed: cannot build offline")
  tmp = tmp_path_factory.mktemp("wheel")
  source, out = tmp / "src", tmp / "dist"
  _copy_build_inputs(source)
  result = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
       "--disable-pip-version-check", "-q", "-w", str(out), str(source)],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  [built] = out.glob("instructjax-*.whl")
  with zipfile.ZipFile(built) as archive:
    yield archive


def _repository_modules() -> set[str]:
  return {path.relative_to(ROOT).as_posix() for package in PACKAGES
          for path in (ROOT / package).rglob("*.py") if "__pycache__" not in path.parts}


def test_wheel_holds_every_module_of_the_packages(wheel):
  names = set(wheel.namelist())
  # Package discovery needs an __init__.py in every directory: a module left out is an
  # ImportError only after installing, so compare against the checkout, file by file.
  assert _repository_modules() <= names, sorted(_repository_modules() - names)
  for module in ("instructjax/__init__.py", "instructjax/data/records.py",
                 "instructjax/data/builders/__init__.py", "instructjax/trainers/__init__.py",
                 "experiments/run.py", "experiments/configs/sft.py"):
    assert module in names
  assert not any(name.startswith("tests/") for name in names)


def test_wheel_requires_exactly_the_pins_of_requirements_txt(wheel):
  [metadata] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
  fields = email.parser.Parser().parsestr(wheel.read(metadata).decode())
  pins = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
  assert fields.get_all("Requires-Dist") == pins
  assert fields["Requires-Python"] == ">=3.11"
