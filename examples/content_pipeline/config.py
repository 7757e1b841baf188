"""The incident report's knobs, by their names, from the environment (the demo sets them per scenario)."""

from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./pipeline.db")
BROKER_URL = os.environ.get("BROKER_URL", "sqla+sqlite:///./broker.db")
RESULT_BACKEND = os.environ.get("RESULT_BACKEND", "db+sqlite:///./results.db")
DB_POOL_SIZE = _int("DB_POOL_SIZE", 2)
DB_MAX_OVERFLOW = _int("DB_MAX_OVERFLOW", 2)
DB_POOL_TIMEOUT = _float("DB_POOL_TIMEOUT", 60)
MAX_DB_CONCURRENT = _int("MAX_DB_CONCURRENT", 3)
CONCEPTS = _int("CONCEPTS", 30)
LLM_SECONDS = _float("LLM_SECONDS", 0.3)  # per step; Tutorial -> Resource -> Quiz
SAVE_SECONDS = _float("SAVE_SECONDS", 0.2)  # time a save holds its session (slow writes)
BATCH_SIZE = _int("BATCH_SIZE", 0)  # 0: save each concept on its own (the incident report's way); N: plan 2
SSE_HOLDS_SESSION = os.environ.get("SSE_HOLDS_SESSION", "1") == "1"  # planted (the report's streams hold no session)
STREAM_SECONDS = _float("STREAM_SECONDS", 3.0)
