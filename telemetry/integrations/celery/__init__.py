"""Celery: task signals, queue wait and owners (``tasks``); queue backlog and worker slots
(``capacity``)."""
