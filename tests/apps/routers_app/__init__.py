"""A router-based FastAPI app laid out as real apps are (the full-stack template's shape):
routers in modules, prefix chains, nested ``include_router``, a dependency that yields a session,
an ``APIRoute`` subclass, a mounted sub-application, a WebSocket and a streaming route."""
