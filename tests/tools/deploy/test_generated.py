"""Generated files are committed and current; the catalogue is complete and consistent."""

from __future__ import annotations

import os

from telemetry._core.catalogue import CATALOGUE, COUNTER, GAUGE, HOST_WIDE
from telemetry.tools.deploy import generate as _generate
from tests import ROOT


def test_generated_files_are_current():
    stale = []
    for rel, render in _generate.targets(ROOT).items():
        with open(os.path.join(ROOT, rel)) as fh:
            if fh.read() != render():
                stale.append(rel)
    assert not stale, f"stale generated files (run `telemetry generate`): {stale}"


def test_catalogue_conventions():
    for spec in CATALOGUE.values():
        if spec.name in HOST_WIDE:
            # the shared view: host-wide, from one poller per host, no service or pid of its own
            assert "pid" not in spec.labels, spec.name
            assert spec.unit, spec.name
            continue
        assert spec.labels[0] == "service", spec.name
        assert spec.unit, spec.name
        if spec.kind == COUNTER:
            assert spec.name.endswith("_total"), spec.name
        if spec.kind == GAUGE:
            assert spec.labels[-1] == "pid", spec.name
        else:
            assert "pid" not in spec.labels, spec.name
        if spec.unit == "seconds":
            assert spec.name.endswith("_seconds"), spec.name
