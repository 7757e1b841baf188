"""``telemetry demo``: the reference pipeline, its scenarios, the stack it runs on, the alert chain,
the report and its advice."""
