"""Tests of ``telemetry/tools/live``."""
