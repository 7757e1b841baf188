"""The version matrix's selection (docs/testing.md): the oldest versions and Python 3.13 run the
tests marked ``matrix``. Every integration in the registry has at least one of them, every
subject a marker names is one this page knows (a typo would silently leave a library
untested), and ``-m matrix`` really selects them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from telemetry import _api as _instrument

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: subjects beyond the integrations: libraries and runtimes the core itself depends on
CORE_SUBJECTS = {"python", "prometheus_client", "structlog"}


def _subjects(*args: str) -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-p", "tests.matrix_subjects", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("MATRIX-SUBJECTS "))
    return dict(json.loads(line.split(" ", 1)[1]))


def test_every_integration_has_a_test_on_the_oldest_versions_and_python_313():
    marked = _subjects("-m", "matrix")
    named = {s for subjects in marked.values() for s in subjects}
    integrations = {e.name for e in _instrument.INTEGRATIONS}
    assert integrations <= named, f"no matrix test for: {sorted(integrations - named)}"
    assert named <= integrations | CORE_SUBJECTS, f"unknown matrix subjects: {sorted(named - integrations - CORE_SUBJECTS)}"
    for subject in integrations:  # each integration has a test of its own, not only the registry-wide one
        own = [n for n, s in marked.items() if subject in s and "test_instrument.py" not in n]
        assert own, f"only tests/test_instrument.py covers {subject} in the matrix"
