"""The demo's scenarios: the incident report's configuration (its knobs by their names), its two
plans, the planted suspects and the remedies the diagnoses recommend."""

from __future__ import annotations

from dataclasses import dataclass, field

from telemetry.tools._proc import DemoError

#: the incident report's configuration (its knobs by their names); every scenario starts here
SEED: dict[str, str] = {
    "DB_POOL_SIZE": "2", "DB_MAX_OVERFLOW": "2", "MAX_DB_CONCURRENT": "3", "UVICORN_WORKERS": "4",
    "CELERY_CONTENT_CONCURRENCY": "6", "CELERY_LOGS_CONCURRENCY": "4", "CELERY_WORKFLOW_CONCURRENCY": "4",
    "BATCH_SIZE": "0",
}  # fmt: skip
_PLAN1 = {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "5", "MAX_DB_CONCURRENT": "8", "UVICORN_WORKERS": "2",
          "CELERY_CONTENT_CONCURRENCY": "3"}  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    kind: str  # "report" (its configuration), "plan" (its plans), "suspect" (planted), "remedy"
    about: str
    env: dict[str, str] = field(default_factory=dict)
    real_only: bool = False  # needs the pooler, PostgreSQL's row locks or Redis


SCENARIOS: dict[str, Scenario] = {
    "seed": Scenario("report", "the incident report's configuration and code, nothing planted"),
    "fixed": Scenario("plan", "the report's plan 1: pools 5+5, semaphore 8, 2 API workers, content concurrency 3", _PLAN1),
    "batched": Scenario("plan", "the report's plan 2: plan 1 plus saves of 5 concepts per session", {**_PLAN1, "BATCH_SIZE": "5"}),
    "stream-session": Scenario("suspect", "PLANTED: each status stream polls the database on one session for its life",
                               {"STREAM_HOLDS_SESSION": "1"}),
    "stream-session-remedy": Scenario("remedy", "the diagnosis's fix: a short session per poll", {"STREAM_SESSION_PER_POLL": "1"}),
    "sync-call": Scenario("suspect", "PLANTED: /roadmaps makes a 0.6 s synchronous call inside async def",
                          {"SYNC_CALL_SECONDS": "0.6"}),
    "sync-call-remedy": Scenario("remedy", "the diagnosis's fix: the call runs in a thread (asyncio.to_thread)",
                                 {"SYNC_CALL_SECONDS": "0.6", "SYNC_CALL_OFFLOADED": "1"}),
    "worker-transactions": Scenario("suspect", "PLANTED: each concept's transaction opens before its LLM steps",
                                    {"TX_ACROSS_LLM": "1"}, real_only=True),
    "worker-transactions-remedy": Scenario("remedy", "the diagnosis's fix: the transaction around the write only", {}, real_only=True),
    "redis-subscriptions": Scenario("suspect", "PLANTED: status streams subscribe through the API's shared Redis pool "
                                    "(the report's max_connections 50 scaled to 2 per process)",
                                    {"SUBSCRIBE_ON_SHARED_POOL": "1", "REDIS_MAX_CONNECTIONS": "2"}, real_only=True),
    "redis-subscriptions-remedy": Scenario("remedy", "the diagnosis's fix: subscriptions on a pool of their own",
                                           {"SUBSCRIBE_DEDICATED": "1", "REDIS_MAX_CONNECTIONS": "2"}, real_only=True),
    "row-lock": Scenario("suspect", "PLANTED: the content task locks its task row across 8 LLM steps (its outline)",
                         {"ROW_LOCK_ACROSS_LLM": "1"}, real_only=True),
    "row-lock-remedy": Scenario("remedy", "the diagnosis's fix: no lock across the model call", {}, real_only=True),
}  # fmt: skip
#: the worker groups of the report: (queue, concurrency knob)
GROUPS = (("content", "CELERY_CONTENT_CONCURRENCY"), ("logs", "CELERY_LOGS_CONCURRENCY"),
          ("workflow", "CELERY_WORKFLOW_CONCURRENCY"))  # fmt: skip
#: the report's ~50 server connections behind the pooler, scaled to the demo's client count
POOLER_SERVER_CONNECTIONS = 12
#: the real stack's pgbouncer max_client_conn
POOLER_CLIENTS = 500


def choose(names: str, stack: str) -> list[str]:
    """The scenarios ``--scenario a,b,...`` (or ``all``) runs on ``stack``, in that order."""
    if names == "all":
        return [n for n, s in SCENARIOS.items() if stack == "real" or not s.real_only]
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    for name in chosen:
        if name not in SCENARIOS:
            raise DemoError(f"--scenario: unknown scenario {name!r}; expected 'all' or a comma-separated list of "
                            f"{', '.join(SCENARIOS)}")  # fmt: skip
        if SCENARIOS[name].real_only and stack != "real":
            raise DemoError(f"--scenario {name} needs --stack real (the pooler, PostgreSQL's row locks or Redis); "
                            f"on the embedded stack: {', '.join(n for n, s in SCENARIOS.items() if not s.real_only)}")  # fmt: skip
    if not chosen:
        raise DemoError("--scenario: expected 'all' or a comma-separated list of scenario names")
    return chosen
