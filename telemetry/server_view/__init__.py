"""What the server and the pooler see, joined to our owners: the SQL and its I/O (``queries``), the
pure model (``model``), the events (``events``), the published figures (``published``), the one
poller per deployment (``poller``, ``cluster``) and pooler sources over HTTP (``pooler_metrics``)."""
