"""Tests of ``telemetry/integrations``."""
