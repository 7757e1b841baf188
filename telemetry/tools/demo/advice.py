"""The demo's capacity advice and its proof.

After each scenario the demo computes ``telemetry budget``'s advice from the scrapes it took
during the load (the same arithmetic as ``--metrics-url``, on the demo's clock for the hold
threshold). Where size is the answer and the configuration could not carry the load, it re-runs
the scenario with the advised sizes and checks that they held: no API pool timeouts, no checkout
wait p95 over the alert's threshold (on the demo's clock), none of the pool alerts fired. Where
size is not the answer (an owner to release), the proof is the scenario's remedy, when it ran:
the owner no longer dominates there and the API has no pool timeouts. The report's own plans are
judged against the advice for the ``seed`` scenario's load.
"""

from __future__ import annotations

from typing import Any

from telemetry import thresholds as T
from telemetry.tools.live import capacity

from . import alerting as _alerting

#: alerts a size that holds must not fire (on the demo's clock)
POOL_ALERTS = ("DbPoolCheckoutTimeouts", "DbPoolCheckoutWaitHigh", "DbPoolUsageCritical")


def overrides(advice: capacity.Advice) -> dict[str, dict[str, str]]:
    """Per service, the knobs of the reference pipeline that apply the advice; empty when nothing
    is to be resized (it carries, or an owner is to be released)."""
    if advice.carries or any(p.release is not None for p in advice.pools):
        return {}
    out: dict[str, dict[str, str]] = {}
    for p in main_pools(advice):
        if not p.carries and p.grow:  # a full pool the load needs no more of: size is not the answer
            out.setdefault(p.service, {}).update(DB_POOL_SIZE=str(p.pool_size), DB_MAX_OVERFLOW=str(p.max_overflow))
    for s in advice.semaphores:
        if s.is_the_cap and s.semaphore == "MAX_DB_CONCURRENT":
            out.setdefault(s.service, {})["MAX_DB_CONCURRENT"] = str(s.capacity_needed)
    return out


def main_pools(advice: capacity.Advice) -> list[capacity.PoolAdvice]:
    """Each service's busiest pool (the pipeline's engine, whose knobs the demo sets; kombu's
    SQLAlchemy transport has pools of its own on the embedded stack)."""
    best: dict[str, capacity.PoolAdvice] = {}
    for p in advice.pools:
        if p.service not in best or p.checkouts_per_second > best[p.service].checkouts_per_second:
            best[p.service] = p
    return [best[s] for s in sorted(best)]


def held(result: dict[str, Any], pool_timeout: float, services: set[str] | None = None) -> dict[str, Any]:
    """Whether a run carried its load in ``services`` (the ones resized; default all): no API pool
    timeouts, their checkout wait p95 under the alert's threshold on the demo's clock, no pool
    alert of theirs fired."""
    threshold = T.WAIT_P95_SECONDS_WARNING * _alerting.rules_config(pool_timeout).seconds_scale

    def judged(service: str) -> bool:
        return services is None or service in services

    waits = {s: v for s, v in result["checkout_wait_p95_seconds"].items()
             if judged(s) and v is not None and v > threshold}  # fmt: skip
    fired = sorted({a["alert"] for a in result["alerts"]
                    if a["alert"] in POOL_ALERTS and judged(a["labels"].get("service", ""))})  # fmt: skip
    api_timeouts = result["api"]["pool_timeouts"] if judged("api") else 0
    ok = not api_timeouts and not waits and not fired
    return {"held": ok, "services": sorted(services) if services is not None else "all",
            "api_pool_timeouts": result["api"]["pool_timeouts"], "waits_over_threshold": waits,
            "wait_threshold_seconds": threshold, "pool_alerts_fired": fired}  # fmt: skip


def remedy_proof(advice: capacity.Advice, remedy: dict[str, Any], remedy_advice: capacity.Advice) -> dict[str, Any]:
    """Size was not the answer: the remedy that ran released the named owner and the API had
    no pool timeouts."""
    released = {p.service: p.release.owner for p in advice.pools if p.release is not None}
    still = {p.service: p.release.owner for p in remedy_advice.pools if p.release is not None}
    ok = not remedy["api"]["pool_timeouts"] and not any(still.get(s) == o for s, o in released.items())
    return {"held": ok, "remedy": remedy["scenario"], "released": released, "still_dominant_in_remedy": still,
            "api_pool_timeouts": remedy["api"]["pool_timeouts"]}  # fmt: skip


def judge_plans(advice: capacity.Advice, plans: dict[str, dict[str, str]], seed: dict[str, str]) -> list[dict[str, Any]]:
    """The report's plans beside the advice for the seed's load: per service and plan, the
    pool (pool_size + max_overflow) and semaphore against what the advice asks."""
    rows = []
    for name, env in plans.items():
        knobs = {**seed, **env}
        size, overflow, sem = int(knobs["DB_POOL_SIZE"]), int(knobs["DB_MAX_OVERFLOW"]), int(knobs["MAX_DB_CONCURRENT"])
        for p in main_pools(advice):
            if p.release is not None:
                verdict = f"no size carries it: release {p.release.owner!r}"
            else:
                need = p.pool_size + p.max_overflow
                verdict = "enough" if size + overflow >= need else f"short by {need - size - overflow} per process"
            rows.append({"plan": name, "service": p.service, "plan_pool": f"{size}+{overflow}",
                         "advised_pool": f"{p.pool_size}+{p.max_overflow}", "verdict": verdict})  # fmt: skip
        for s in advice.semaphores:
            if s.is_the_cap:
                rows.append({"plan": name, "service": s.service, "plan_pool": f"semaphore {sem}",
                             "advised_pool": f"semaphore {s.capacity_needed}",
                             "verdict": "enough" if sem >= s.capacity_needed else f"short by {s.capacity_needed - sem}"})  # fmt: skip
    return rows


def render(entry: dict[str, Any]) -> list[str]:
    """The advice block of one scenario in the report."""
    out = ["capacity advice (telemetry budget, from this run's scrapes):"]
    out += ["  " + line for line in entry["text"]]
    proof = entry.get("proof")
    if proof is None:
        out.append("  proof: " + entry.get("no_proof", "-"))
    elif "remedy" in proof:
        out.append(f"  proof: the remedy {proof['remedy']} " + ("released the owner and had no API pool timeouts"
                   if proof["held"] else f"did not hold ({proof})"))  # fmt: skip
    else:
        sizes = "; ".join(f"{svc}: " + ", ".join(f"{k}={v}" for k, v in knobs.items()) for svc, knobs in entry["overrides"].items())
        out.append(f"  proof: re-run with {sizes}: " + ("held (no API pool timeouts, checkout wait p95 under "
                   f"{proof['wait_threshold_seconds'] * 1000:.0f} ms, no pool alert)" if proof["held"] else f"did NOT hold: {proof}"))  # fmt: skip
    return out
