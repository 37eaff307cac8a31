"""The `mssgw` command line: one sub-command group per concern, each registered by its module.

A module that adds commands exposes `register(subparsers)`; each command's handler gets the
parsed arguments and returns the process exit code. Errors the user can fix are printed as
one clear line (exit 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from config.errors import ConfigError
from gateway.errors import GatewayError

DEFAULT_CONFIG = "config/dev.toml"

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    from gateway import cli_commands  # the registry of command modules

    parser = argparse.ArgumentParser(prog="mssgw", description="Secure mail gateway for health professionals (MSSanté).")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"configuration file (default: {DEFAULT_CONFIG})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in cli_commands.REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ConfigError, GatewayError) as exc:
        print(f"mssgw: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mssgw ... | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0


def add_command(sub: Any, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    """Add one command; the returned parser takes its own arguments."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler)
    return p


if __name__ == "__main__":
    sys.exit(main())
