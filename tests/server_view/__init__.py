"""Tests of ``telemetry/server_view``."""
