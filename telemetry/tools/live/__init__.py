"""Tools run against live deployments: ``diagnose``, ``capacity``, ``budget``."""
