"""The `failproxy` command line (SPEC 2): serve, check, demo, --version."""

from __future__ import annotations

import argparse
import sys

from failproxy import BUILD, __version__, config
from failproxy.routing import policy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="failproxy",
        description="Per-host front proxy: the local UNIX socket first, then ordered TCP peers.",
    )
    parser.add_argument("--version", action="version", version=f"failproxy {__version__} ({BUILD})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser("serve", help="run the proxy in the foreground")
    serve.add_argument("config", metavar="CONFIG", help="TOML configuration file")
    check = commands.add_parser("check", help="validate CONFIG and print the server order")
    check.add_argument("config", metavar="CONFIG", help="TOML configuration file")
    # The demo parses its own options (`failproxy demo --help` shows them).
    commands.add_parser(
        "demo", help="a 3-host cluster on loopback under skewed load", add_help=False
    )
    return parser


def _load(path: str) -> config.Config | None:
    """The config, or None after printing every problem on stderr."""
    try:
        return config.load(path)
    except config.ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None


def _check_lines(cfg: config.Config) -> list[str]:
    """The order a request walks as `serve` would start with it: peers from DNS resolved now,
    and the address taken as self with the reason."""
    if not cfg.upstream.peers and cfg.upstream.self is not None:
        return policy.describe_order(cfg)
    import asyncio

    from failproxy.discovery import watch

    found = asyncio.run(watch.resolve_once(cfg))
    try:
        choice = found.self_choice
        lines = policy.describe_order(cfg, found.servers(), choice.address,
                                      choice.reason if choice.detected else "")
        for i, entry in enumerate(found.entries):
            if entry.error is not None:
                lines.append(
                    f"upstream.peers[{i}].dns: {entry.error} (serve starts without these peers "
                    f"and asks again every {entry.conf.resolve_interval:g} s)"
                )
        if cfg.upstream.peers and choice.address is None:
            lines.append(choice.reason)
        return lines
    finally:
        found.close()


def _overflow_line(cfg: config.Config) -> str:
    """How a busy box's requests are placed (upstream.overflow, hold_timeout, slow_after)."""
    up = cfg.upstream
    if up.overflow == "ring":
        return 'overflow: ring (upstream.overflow = "ring"): the order above, on connect errors'
    primaries = [s for s in up.servers if not s.backup]
    if (len(primaries) != 1 or not primaries[0].address.is_unix
            or (len(up.servers) == 1 and not up.peers)):
        return ("overflow: ring (the room policy needs one unix: primary and backups): the order "
                "above, on connect errors")
    hold = (f"held up to upstream.hold_timeout = {up.hold_timeout:g} s, then where its "
            "expected wait is least" if up.hold_timeout > 0
            else "where its expected wait is least (upstream.hold_timeout = 0)")
    fast = (f"; a box whose answers all came within upstream.slow_after = {up.slow_after:g} s "
            "waits for its own workers" if up.slow_after > 0 else "")
    return ("overflow: room (upstream.overflow): the UNIX socket while the box has an idle worker "
            "(learned), else the least-loaded backup with room (its concurrency learned), else "
            + hold + fast + '; overflow = "ring" for the order alone')


def _routes_line(cfg: config.Config) -> str:
    """Which routes the room policy treats as slow ([routes])."""
    rc = cfg.routes
    learned = (f"learned slower than routes.slow_ms = {rc.slow_ms:g} ms" if rc.learn
               else "not learned (routes.learn = false)")
    slow = ", ".join(rc.slow) or "none"
    fast = ", ".join(rc.fast) or "none"
    shed = (f"answered 503 after routes.shed_after = {rc.shed_after:g} s held" if rc.shed_after
            else "never shed (routes.shed_after = 0)")
    return (f"routes: slow when {learned} or under routes.slow = {slow}; always fast under "
            f"routes.fast = {fast}; a slow-route request waits in failproxy after fast ones, "
            f"{shed}")


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status is returned, not raised, so tests can call it."""
    args_list = sys.argv[1:] if argv is None else argv
    parser = _parser()
    try:
        args, rest = parser.parse_known_args(args_list)
        if rest and args.command != "demo":
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as e:  # --help, --version, bad usage
        return e.code if isinstance(e.code, int) else 2
    if args.command == "demo":
        from failproxy.demo import cluster

        return cluster.main(rest)
    cfg = _load(args.config)
    if cfg is None:
        return 1
    if args.command == "check":
        print("ok")
        for line in _check_lines(cfg):
            print(line)
        print(_overflow_line(cfg))
        print(_routes_line(cfg))
        return 0
    from failproxy.process import (
        master,  # forks workers and pulls in the event loop: only for serve
    )

    return master.serve(args.config)
