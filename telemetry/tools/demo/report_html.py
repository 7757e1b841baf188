"""The demo's ``report.html``: all scenarios side by side, matplotlib charts (a panel per
scenario on a shared scale, thresholds and fired alerts marked), the diagnoses and alerts."""

from __future__ import annotations

import html
from typing import Any

from telemetry import thresholds as T

from .report import _fmt_s, _pct, alert_lines

#: the charts of report.html: (timeline key, title, y label, as percent, thresholds)
CHARTS = (
    ("usage", "pool usage of the busiest process, per service", "checked out / max (%)", True,
     ((T.POOL_USAGE_WARNING, "warning 80%"), (T.POOL_USAGE_CRITICAL, "critical 95%"))),
    ("latency", "API p95 of ordinary pages (per 0.5 s)", "seconds", False, ()),
    ("pooler_waiting", "pgbouncer clients waiting for a server connection", "clients", False, ()),
    ("semaphore_waiters", "tasks queued at MAX_DB_CONCURRENT (all content processes)", "tasks", False, ()),
)  # fmt: skip


def chart(timelines: dict[str, dict[str, Any]], key: str, title: str, ylabel: str, percent: bool,
          thresholds: tuple[tuple[float, str], ...]) -> str | None:  # fmt: skip
    """One figure, one panel per scenario on a shared scale, as inline SVG (text kept as text);
    None when no scenario has data for it."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s, tl in timelines.items() if any(tl.get(key, {}).values())]
    if not scenarios:
        return None
    cols = min(3, len(scenarios))
    rows = (len(scenarios) + cols - 1) // cols
    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9}):
        fig, axes = plt.subplots(
            rows, cols, figsize=(4.2 * cols, 2.6 * rows), sharex=True, sharey=True, squeeze=False
        )
        scale = 100.0 if percent else 1.0
        for ax, scenario in zip(axes.flat, scenarios, strict=False):
            for name, points in sorted(timelines[scenario][key].items()):
                if points:
                    ax.plot(
                        [t for t, _ in points],
                        [v * scale for _, v in points],
                        label=name,
                        linewidth=1.4,
                    )
            for value, label in thresholds:
                ax.axhline(
                    value * scale,
                    linestyle="--",
                    linewidth=0.9,
                    color="#c0392b" if value >= 0.9 else "#e67e22",
                )
                ax.annotate(label, (0, value * scale), fontsize=7, color="#555", va="bottom")
            for at, name, severity in timelines[scenario].get("alerts", []):
                ax.axvline(
                    at,
                    linestyle=":",
                    linewidth=1.0,
                    color="#c0392b" if severity == "critical" else "#e67e22",
                )
                ax.annotate(name, (at, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=6,
                            color="#555", va="top", ha="right")  # fmt: skip
            ax.set_title(scenario)
            ax.set_xlabel("seconds since the load started")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
        for ax in list(axes.flat)[len(scenarios) :]:
            ax.set_visible(False)
        fig.suptitle(title)
        fig.tight_layout()
        out = io.StringIO()
        fig.savefig(out, format="svg")
        plt.close(fig)
    svg = out.getvalue()
    return svg[svg.index("<svg") :]


def _table(results: list[dict[str, Any]]) -> str:
    """All scenarios side by side: the figures a reader compares."""
    rows = [
        ("ordinary pages", lambda r: f"{r['api']['requests']:.0f}"),
        ("failed pages", lambda r: _pct(r["api"]["timeout_rate"])),
        ("API p95", lambda r: _fmt_s(r["api"]["p95_seconds"])),
        ("API pool timeouts", lambda r: f"{r['api']['pool_timeouts']:.0f}"),
        ("share waiting for the pool", lambda r: _pct(r["api"]["share_waiting_for_pool"])),
        ("API pool peak", lambda r: _pct(r["pool_usage_peak"].get("api"))),
        ("pooler clients waiting (peak)", lambda r: f"{r['pooler_clients_waiting_peak']:.0f}"),
        ("event loop blocked", lambda r: f"{r['event_loop_blocked']:.0f}"),
        ("concepts/s per task", lambda r: "-" if r["concepts_per_second"] is None else f"{r['concepts_per_second']:.1f}"),
        ("healthy", lambda r: "yes" if r["verdict"]["healthy"] else "no"),
    ]  # fmt: skip
    head = "".join(f"<th>{html.escape(r['scenario'])}</th>" for r in results)
    body = "".join(f"<tr><th style='text-align:left'>{html.escape(label)}</th>"
                   + "".join(f"<td>{html.escape(str(get(r)))}</td>" for r in results) + "</tr>"
                   for label, get in rows)  # fmt: skip
    return f"<table border='1' cellpadding='4' style='border-collapse:collapse'><tr><th></th>{head}</tr>{body}</table>"


def render_html(
    results: list[dict[str, Any]], timelines: dict[str, dict[str, Any]], text: str
) -> str:
    body = ["<html><head><meta charset='utf-8'><title>telemetry demo: incident report</title></head>",
            "<body style='font-family: sans-serif'><h1>Incident report</h1>", "<h2>All scenarios</h2>",
            _table(results)]  # fmt: skip
    for key, title, ylabel, percent, thresholds in CHARTS:
        svg = chart(timelines, key, title, ylabel, percent, thresholds)
        if svg is not None:
            body.append(f"<h2>{html.escape(title)}</h2>")
            body.append(svg)
    body.append("<h2>Diagnosis per scenario</h2>")
    for r in results:
        body.append(f"<h3>{html.escape(r['scenario'])}</h3><p>{html.escape(r['diagnosis'])}</p>")
        body.extend(f"<p>also: {html.escape(f)}</p>" for f in r.get("beyond_the_pools") or [])
        body.append("<pre>" + html.escape("\n".join(alert_lines(r))) + "</pre>")
    body.append(f"<pre>{html.escape(text)}</pre></body></html>")
    return "\n".join(body)
