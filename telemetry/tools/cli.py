"""The ``telemetry`` command.

telemetry demo [--stack embedded|real] [--scenario NAME|all] [--duration S] ...
                                           reproduce the incident and diagnose it
telemetry rules [--selector 'job="api"'] [--usage-warning 0.8] [--usage-critical 0.95]
                [--hold-seconds 5] [--runbook-url URL] [--grafana-url URL] [--out FILE]
                                           the Prometheus rules for a deployment
telemetry alertmanager --out DIR [--pagerduty-key-file F] [--slack-webhook-file F]
                       [--slack-channel C]  Alertmanager's routes, receivers, templates
telemetry dashboards --out DIR [--selector 'job="api"']
                                           the Grafana dashboards (JSON)
telemetry generate [--root DIR]            regenerate the repository's committed files
telemetry prepare-multiproc-dir DIR        empty the multiprocess directory (deploy start)
telemetry serve-metrics --dir DIR [--port P] [--addr A]
                                           serve the host aggregate of DIR on /metrics
                                           (and poll the server/pooler view when
                                           TELEMETRY_SERVER_VIEW_URL / _PGBOUNCER_URL are set)
telemetry diagnose --metrics-url URL [--metrics-url URL2 ...] | --prometheus-url URL [--window 10s|15m]
                                           where the time goes (pools, pooler, locks,
                                           server) and which service/owner causes it;
                                           exit 0 nothing found, 1 findings, 2 unreadable
telemetry budget FILE.yml | --limit N --service NAME=PxSIZE+OVERFLOW ...
                                           worst-case connections against the limit;
                                           exit 1 when it does not fit, 2 on bad input
telemetry budget --metrics-url URL [...] | --prometheus-url URL [--window W] [--margin 0.25]
                                           the pool sizes, semaphore and server connections
                                           the measured load needs (Little's law), or the
                                           holder to release; exit 1 when the current
                                           configuration cannot carry it, 2 unreadable
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {kind.__name__} > 0, got {text!r}"
            ) from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} > 0, got {text!r}")
        return value

    return parse


def _read_secret(path: str, flag: str) -> str:
    from telemetry._core.settings import ConfigError

    try:
        with open(path) as fh:
            value = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"invalid {flag}={path!r}: cannot read it ({exc.strerror})") from None
    if not value:
        raise ConfigError(f"invalid {flag}={path!r}: the file is empty")
    return value


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="telemetry", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="regenerate docs tables, rule files and dashboards")
    gen.add_argument("--root", default=_root())
    prep = sub.add_parser("prepare-multiproc-dir", help="empty the multiprocess directory")
    prep.add_argument("directory")
    serve = sub.add_parser("serve-metrics", help="serve a host's aggregate /metrics")
    serve.add_argument("--dir", required=True, dest="directory")
    serve.add_argument("--port", type=int, default=9464)
    serve.add_argument("--addr", default="127.0.0.1", help="default loopback; widen explicitly")
    serve.add_argument(
        "--bearer-token-file", help="require 'Authorization: Bearer <token in file>'"
    )
    serve.add_argument("--basic-auth-file", help="require basic auth; the file holds user:password")
    bud = sub.add_parser("budget", help="check worst-case connections against the server limit")
    bud.add_argument(
        "file", nargs="?", help="YAML: limit, reserved, services{processes,pool_size,max_overflow}"
    )
    bud.add_argument("--limit", type=int, help="connections the server or pooler allows")
    bud.add_argument("--reserved", type=int, default=0)
    bud.add_argument(
        "--service", action="append", default=[], help="NAME=PROCESSESxPOOL_SIZE+MAX_OVERFLOW"
    )
    bud.add_argument("--metrics-url", action="append", dest="urls", default=[],
                     help="measure: hosts' /metrics, scraped every 0.5 s over --window (repeat for several hosts)")  # fmt: skip
    bud.add_argument("--prometheus-url", help="measure: a Prometheus server over the last --window")
    bud.add_argument("--window", default=None, help="the measured window (default 30s with --metrics-url, 15m with --prometheus-url)")
    bud.add_argument("--margin", type=float, default=0.25, help="headroom over the measured need (default 0.25: 25%%)")
    bud.add_argument("--json", action="store_true", help="measure: print the advice as JSON")
    bud.add_argument("--hold-threshold", type=_positive(float), default=None,
                     help="measure: the hold threshold in seconds (default: the alert's, 5)")
    bud.add_argument("--server-limit", type=_positive(int), default=None,
                     help="measure: server connections the pooler (or server) allows, when not read from the view")
    bud.add_argument("--client-limit", type=_positive(int), default=None,
                     help="measure: client connections the pooler (or server) accepts, when not read from the view")
    diag = sub.add_parser(
        "diagnose", help="say where the time goes and who causes it, from hosts' /metrics"
    )
    source = diag.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--metrics-url",
        action="append",
        dest="urls",
        default=[],
        help="a host's /metrics, read now (repeat for several hosts)",
    )
    source.add_argument(
        "--prometheus-url",
        help="a Prometheus server (its HTTP query API), e.g. http://prometheus:9090",
    )
    diag.add_argument(
        "--window", default=None,
        help="the window looked at: with --metrics-url, scraped for that long (default 10s: counters "
             "as their increase, gauges at their peak); with --prometheus-url, the last 15m by default",
    )  # fmt: skip
    demo = sub.add_parser("demo", help="reproduce the content-pipeline incident and diagnose it")
    from .demo.command import SCENARIOS

    demo.add_argument(
        "--scenario",
        default="all",
        help=f"all that the stack can run (default) or a comma-separated list of: {', '.join(SCENARIOS)}",
    )
    demo.add_argument("--pooler", default="pgbouncer", choices=["pgbouncer", "supavisor"],
                      help="with --stack real: pgbouncer with its console read (default), or supavisor: the same "
                           "pgbouncer behind a proxy that renames every client and no console, as Supabase's "
                           "transaction pooler is seen")  # fmt: skip
    demo.add_argument("--stack", default="embedded", choices=["embedded", "real"],
                      help="embedded: SQLite and kombu's SQLAlchemy transport, nothing to install; real: throwaway "
                           "PostgreSQL behind pgbouncer (transaction mode) and Redis, from the installed binaries")  # fmt: skip
    demo.add_argument(
        "--duration", type=_positive(float), default=15.0, help="seconds of load per scenario"
    )
    demo.add_argument(
        "--generations",
        type=_positive(int),
        default=16,
        help="concurrent POST /generate, each watched by a stream",
    )
    demo.add_argument(
        "--rate", type=_positive(float), default=15.0, help="ordinary page requests per second"
    )
    demo.add_argument("--concepts", type=_positive(int), default=30)
    demo.add_argument(
        "--llm-seconds", type=_positive(float), default=0.3, help="simulated LLM latency per step"
    )
    demo.add_argument(
        "--save-seconds", type=_positive(float), default=0.2, help="time a save holds its session"
    )
    demo.add_argument(
        "--pool-timeout",
        type=_positive(float),
        default=3.0,
        help="pool_timeout (the incident report's 60 s, scaled)",
    )
    demo.add_argument("--prove-advice", action=argparse.BooleanOptionalAction, default=True,
                      help="re-run a scenario with the capacity advice's sizes when size is the answer (default on)")
    demo.add_argument("--alerts", default="auto", choices=["auto", "off"],
                      help="auto (default): the shipped rules in a real Prometheus and Alertmanager when installed, "
                           "notifications captured locally; off: none")  # fmt: skip
    demo.add_argument(
        "--database-url", help="e.g. postgresql+asyncpg://user@127.0.0.1:5432/db (default: SQLite)"
    )
    demo.add_argument(
        "--broker",
        help="e.g. redis://127.0.0.1:6379/0 (default: kombu's SQLAlchemy transport on SQLite)",
    )
    demo.add_argument("--out", default="demo-out", help="where report.json and report.html go")
    from .deploy import command as deploy

    deploy.add_commands(sub)
    args = parser.parse_args(argv)

    from telemetry._core.settings import ConfigError

    try:
        if args.command in ("rules", "alertmanager", "dashboards"):
            return deploy.run(args)
        if args.command == "demo":
            from .demo.command import DemoError, run

            try:
                return run(args)
            except DemoError as exc:
                print(f"telemetry demo: {exc}", file=sys.stderr)
                return 2
        if args.command == "generate":
            from .deploy.generate import generate

            changed = generate(args.root)
            print("\n".join(f"wrote {c}" for c in changed) or "all generated files up to date")
        elif args.command == "prepare-multiproc-dir":
            from telemetry._core.multiprocess import prepare_dir

            print(f"removed {prepare_dir(args.directory)} file(s) from {args.directory}")
        elif args.command == "budget":
            return _budget(args)
        elif args.command == "diagnose":
            from .live.diagnose import EXIT_FINDINGS, EXIT_HEALTHY, EXIT_UNREADABLE
            from .live.diagnose import run as diagnose

            try:
                text, found, unreadable = diagnose(args.urls, args.prometheus_url, args.window)
            except (OSError, ValueError) as exc:
                print(f"telemetry diagnose: {exc}", file=sys.stderr)
                return EXIT_UNREADABLE
            print(text)
            return EXIT_FINDINGS if found else EXIT_UNREADABLE if unreadable else EXIT_HEALTHY
        elif args.command == "serve-metrics":
            from telemetry._api import start_metrics_server

            auth: dict[str, Any] = {}
            if args.bearer_token_file:
                auth["bearer_token"] = _read_secret(args.bearer_token_file, "--bearer-token-file")
            if args.basic_auth_file:
                user, sep, password = _read_secret(
                    args.basic_auth_file, "--basic-auth-file"
                ).partition(":")
                if not sep or not user or not password:
                    raise ConfigError("invalid --basic-auth-file: expected one line user:password")
                auth["basic_auth"] = (user, password)
            start_metrics_server(args.port, args.addr, directory=args.directory, **auth)
            from telemetry._core.settings import Settings

            env = Settings.load()
            if env.server_view_url or env.pgbouncer_url:  # this process may poll the shared side
                from telemetry._api import instrument

                instrument(service="telemetry-serve-metrics", multiproc_dir=args.directory, sqlalchemy=False,
                           celery=False, redis=False, fastapi=False, tracing=False)  # fmt: skip
            print(
                f"serving http://{args.addr}:{args.port}/metrics for {args.directory}", flush=True
            )
            while True:
                time.sleep(3600)
    except ConfigError as exc:
        print(f"telemetry: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def _budget(args: argparse.Namespace) -> int:
    from telemetry._core.settings import ConfigError

    from .live import budget as b

    if args.urls or args.prometheus_url:
        if args.file or args.service or args.limit is not None:
            raise ConfigError("budget: give either hosts to measure (--metrics-url/--prometheus-url) or a "
                              "configuration (FILE or --limit/--service), not both")  # fmt: skip
        return _measured_budget(args)
    if args.file and (args.service or args.limit is not None):
        raise ConfigError("budget: give either a FILE or --limit/--service flags, not both")
    if args.file:
        import yaml

        try:
            with open(args.file) as fh:
                data = b.load_yaml(fh.read(), args.file)
        except OSError as exc:
            raise ConfigError(f"budget: cannot read {args.file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"budget: {args.file} is not valid YAML: {exc}") from None
        budget = b.from_mapping(data, args.file)
    else:
        if args.limit is None or not args.service:
            raise ConfigError("budget: expected a FILE, or --limit N and at least one --service")
        budget = b.from_flags(args.limit, args.service, args.reserved)
    print(b.render(budget))
    return 0 if budget.fits else 1


def _measured_budget(args: argparse.Namespace) -> int:
    """``telemetry budget --metrics-url/--prometheus-url``: the sizes the measured load needs."""
    import json

    from telemetry import thresholds as T
    from telemetry._core.settings import ConfigError

    from .live import capacity
    from .live.diagnose import seconds_of

    if args.urls and args.prometheus_url:
        raise ConfigError("budget: give --metrics-url or --prometheus-url, not both")
    window = args.window or ("15m" if args.prometheus_url else "30s")
    try:
        seconds = seconds_of(window)
    except ValueError as exc:
        raise ConfigError(f"budget: {exc}") from None
    try:
        if args.prometheus_url:
            if not args.prometheus_url.startswith(("http://", "https://")):
                raise ValueError(f"--prometheus-url {args.prometheus_url!r}: expected an http:// or https:// URL")
            w = capacity.from_prometheus(args.prometheus_url, window, seconds)
        else:
            w = capacity.scrape_window(args.urls, seconds)
        advice = capacity.advise(w, args.margin, args.hold_threshold or T.HOLD_SECONDS_WARNING,
                                 (args.server_limit, "--server-limit") if args.server_limit else None,
                                 (args.client_limit, "--client-limit") if args.client_limit else None)  # fmt: skip
    except (OSError, ValueError) as exc:
        print(f"telemetry budget: {exc}", file=sys.stderr)
        return 2
    if not advice.pools:
        print("telemetry budget: no pool metrics (db_pool_connections_max) in the window: are these the /metrics of "
              "processes that called telemetry.instrument()?", file=sys.stderr)  # fmt: skip
        return 2
    print(json.dumps(capacity.as_dict(advice), indent=2) if args.json else "\n".join(capacity.render(advice)))
    return 0 if advice.carries else 1


if __name__ == "__main__":
    sys.exit(main())
