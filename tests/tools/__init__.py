"""Tests of ``telemetry/tools``."""
