"""`edgelora server | client | status | demo` (cli.machines) and `simulate | sweep | centralized | evaluate |
methods` (cli.experiments). Transport and training code is imported lazily, per subcommand."""
from __future__ import annotations

import argparse
import sys

from ..configtools import ConfigError
from . import experiments, machines
from .common import _setup_logging


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgelora", description=__doc__)
    ap.add_argument("--verbose", "-v", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="cmd", required=True)
    machines.add_commands(sub)
    experiments.add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..state import RoundsAbandoned

    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False), quiet=getattr(args, "quiet", False))
    if getattr(args, "allocator", "system") != "system":  # before anything is loaded: this process is replaced
        from ..edge_client.allocator import AllocatorError, restart_under

        try:
            restart_under(args.allocator, list(sys.argv[1:] if argv is None else argv))
        except AllocatorError as e:
            print(f"edgelora {args.cmd}: {e}", file=sys.stderr)
            return 2
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"edgelora: config error: {e}", file=sys.stderr)
        return 2
    except RoundsAbandoned as e:  # a simulation or a sweep whose devices keep failing (the server: server.app)
        print(f"edgelora {args.cmd}: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:  # a device that cannot reach its server (edge_client.runtime)
        print(f"edgelora {args.cmd}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nedgelora {args.cmd}: interrupted", file=sys.stderr)
        return 130
