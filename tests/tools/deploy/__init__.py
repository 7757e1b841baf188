"""Tests of ``telemetry/tools/deploy``."""
