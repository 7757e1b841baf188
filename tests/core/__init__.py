"""Tests of ``telemetry/_core``."""
