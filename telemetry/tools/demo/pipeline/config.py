"""The incident report's knobs, by their names, from the environment (the demo sets them per
scenario); then the planted hypotheses, each off unless a suspect scenario turns it on."""

from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./pipeline.db")
BROKER_URL = os.environ.get("BROKER_URL", "sqla+sqlite:///./broker.db")
RESULT_BACKEND = os.environ.get("RESULT_BACKEND", "db+sqlite:///./results.db")
# the status streams read Redis only (the report); empty on the embedded stack: heartbeats only
REDIS_URL = os.environ.get("REDIS_URL", "")
REDIS_MAX_CONNECTIONS = _int("REDIS_MAX_CONNECTIONS", 50)  # the report's max_connections
REDIS_TIMEOUT = _float("REDIS_TIMEOUT", 3.0)
DB_POOL_SIZE = _int("DB_POOL_SIZE", 2)
DB_MAX_OVERFLOW = _int("DB_MAX_OVERFLOW", 2)
DB_POOL_TIMEOUT = _float("DB_POOL_TIMEOUT", 60)
MAX_DB_CONCURRENT = _int("MAX_DB_CONCURRENT", 3)
CONCEPTS = _int("CONCEPTS", 30)
LLM_SECONDS = _float("LLM_SECONDS", 0.3)  # per step; Tutorial -> Resource -> Quiz
SAVE_SECONDS = _float("SAVE_SECONDS", 0.2)  # time a save holds its session (the report's 2-5 s writes, scaled)
BATCH_SIZE = _int("BATCH_SIZE", 0)  # 0: save each concept on its own (the incident report's way); N: plan 2
STREAM_SECONDS = _float("STREAM_SECONDS", 3.0)

# Planted hypotheses: NOT the report's code. Each suspect scenario turns exactly one on; its
# remedy applies the fix the diagnosis recommends.
STREAM_HOLDS_SESSION = _flag("STREAM_HOLDS_SESSION")  # the stream polls the database on one session for its life
STREAM_SESSION_PER_POLL = _flag("STREAM_SESSION_PER_POLL")  # remedy: a short session per poll
SYNC_CALL_SECONDS = _float("SYNC_CALL_SECONDS", 0.0)  # /roadmaps makes a blocking call inside async def
SYNC_CALL_OFFLOADED = _flag("SYNC_CALL_OFFLOADED")  # remedy: the call runs in a thread
TX_ACROSS_LLM = _flag("TX_ACROSS_LLM")  # each concept's transaction is opened before its LLM steps
SUBSCRIBE_ON_SHARED_POOL = _flag("SUBSCRIBE_ON_SHARED_POOL")  # streams subscribe through the app's shared Redis pool
SUBSCRIBE_DEDICATED = _flag("SUBSCRIBE_DEDICATED")  # remedy: subscriptions on a pool of their own
ROW_LOCK_ACROSS_LLM = _flag("ROW_LOCK_ACROSS_LLM")  # the task row locked (FOR UPDATE) across an LLM step
