"""SQLAlchemy's pools: the hot path (``pool``), their state and naming (``state``), who is who on the
server (``peers``), the rare paths (``events``) and the lifecycle (``engines``)."""
