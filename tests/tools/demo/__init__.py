"""Tests of ``telemetry/tools/demo``."""
