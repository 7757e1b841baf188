"""Tooling that never runs in a user's process: the rule-file, dashboard and catalogue
generators, the connection budget check, the demo and its report, and the ``telemetry`` CLI.

The runtime (everything in ``telemetry`` outside this package) never imports it;
``tests/test_exported_members.py`` checks that ``instrument()`` loads none of these modules.
"""
