"""The ``telemetry`` command.

    telemetry generate [--root DIR]            regenerate committed generated files
    telemetry prepare-multiproc-dir DIR        empty the multiprocess directory (deploy start)
    telemetry serve-metrics --dir DIR [--port P] [--addr A]
                                               serve the host aggregate of DIR on /metrics
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    args = parser.parse_args(argv)

    from ._settings import ConfigError

    try:
        if args.command == "generate":
            from ._generate import generate

            changed = generate(args.root)
            print("\n".join(f"wrote {c}" for c in changed) or "all generated files up to date")
        elif args.command == "prepare-multiproc-dir":
            from ._multiprocess import prepare_dir

            print(f"removed {prepare_dir(args.directory)} file(s) from {args.directory}")
        elif args.command == "serve-metrics":
            from ._instrument import start_metrics_server

            start_metrics_server(args.port, args.addr, directory=args.directory)
            print(f"serving http://{args.addr}:{args.port}/metrics for {args.directory}", flush=True)
            while True:
                time.sleep(3600)
    except ConfigError as exc:
        print(f"telemetry: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
