"""A pytest plugin for ``tests/test_matrix.py``: after collection, prints one JSON line with the
subjects each test marked ``matrix`` names (``python -m pytest --collect-only -p
tests.matrix_subjects``)."""

from __future__ import annotations

import json
from typing import Any


def pytest_collection_finish(session: Any) -> None:
    found = {}
    for item in session.items:
        subjects = [s for mark in item.iter_markers("matrix") for s in mark.args]
        if subjects:
            found[item.nodeid] = subjects
    print("MATRIX-SUBJECTS " + json.dumps(found))
