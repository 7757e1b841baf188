"""`telemetry budget`: the incident report's two configurations do not fit ~50 connections (84 and 160),
a fitting one passes, bad input gets a clear message and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "telemetry.tools.cli", "budget", *args],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip


@pytest.mark.parametrize(("file", "total", "over"), [("seed-before.yml", 84, 34), ("seed-plan1.yml", 160, 110)])
def test_seed_configurations_do_not_fit(file, total, over):
    out = run(os.path.join("alerts", "budget", file))
    assert out.returncode == 1, out.stderr
    assert f"does NOT fit: worst case {total} > 50 ({over} over)" in out.stdout
    totals = [line for line in out.stdout.splitlines() if line.startswith("total")]
    assert totals and totals[0].split()[-1] == str(total)


def test_flags_that_fit():
    out = run("--limit", "50", "--service", "api=2x5+5", "--service", "content=3x3+2")
    assert out.returncode == 0
    assert "fits: 35 <= 50 (15 spare)" in out.stdout


def test_reserved_connections_count():
    out = run("--limit", "40", "--reserved", "10", "--service", "api=4x5+3")
    assert out.returncode == 1 and "worst case 32 > 30" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "50", "--service", "api=4x2"], "expected NAME=PROCESSESxPOOL_SIZE+MAX_OVERFLOW"),
        (["--limit", "0", "--service", "api=4x2+2"], "limit=0: expected a whole number >= 1"),
        (["missing.yml"], "cannot read missing.yml"),
        ([], "expected a FILE, or --limit N and at least one --service"),
    ],
)
def test_bad_input_is_explained(args, message):
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_bad_yaml_values(tmp_path):
    f = tmp_path / "b.yml"
    f.write_text("limit: 50\nservices:\n  api: {processes: 2, pool_size: 5, max_overflow: -1}\n")
    out = run(str(f))
    assert out.returncode == 2 and "services.api.max_overflow=-1: unbounded overflow" in out.stderr
    f.write_text("limit: 50\nservices:\n  api: {procs: 2}\n")
    out = run(str(f))
    assert out.returncode == 2 and "unknown key(s) ['procs']" in out.stderr


@pytest.mark.parametrize("how", ["flags", "file"])
def test_a_service_named_twice_is_refused_naming_it(how, tmp_path):
    """Two entries ``api`` (60 connections in all against 50) were kept as one: "fits: 5 <= 50",
    exit 0. A service given twice is refused (exit 2, naming it), from flags and from a file."""
    if how == "flags":
        out = run("--limit", "50", "--service", "api=1x3+2", "--service", "api=11x3+2")
    else:
        path = tmp_path / "twice.yml"
        path.write_text("limit: 50\nservices:\n  api: {processes: 1, pool_size: 3, max_overflow: 2}\n"
                        "  api: {processes: 11, pool_size: 3, max_overflow: 2}\n")  # fmt: skip
        out = run(str(path))
    assert out.returncode == 2, out.stdout
    assert "'api'" in out.stderr and "twice" in out.stderr and "Traceback" not in out.stderr
    assert "fits" not in out.stdout
