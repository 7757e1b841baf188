"""What a hosted transaction pooler does to names, for the tests: ``telemetry.tools.demo.stack``'s
renaming proxy (shared with ``telemetry demo --stack real --pooler supavisor``)."""

from telemetry.tools.demo.stack import RenamingProxy, rewrite_startup

__all__ = ["RenamingProxy", "rewrite_startup"]
