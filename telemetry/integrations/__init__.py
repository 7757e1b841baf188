"""One module (or folder) per instrumented library, each an ``Integration`` on the core, installed
by ``instrument()`` from the registry in ``telemetry/_api.py`` when its library is present."""
