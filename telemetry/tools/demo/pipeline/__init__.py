"""A small, faithful version of the incident report's backend, instrumented only through
``telemetry.instrument(...)``: FastAPI API, Celery content worker, SQLAlchemy async engine."""
