"""How the scripts report user mistakes: one way, a message on stderr and exit code 2, no traceback.

A script's `main(argv=None) -> int` is `run_script(get_parser(), run, argv)`; `run(args)` raises
`utils.runtime.ConfigError` for a wrong path, flag value or checkpoint, or for a download without a network.
"""
import argparse
import sys
from typing import Callable, List, Optional

from utils.runtime import ConfigError

EXIT_USAGE = 2  # argparse's code for a bad command line, used for every user mistake


def run_script(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Optional[int]],
               argv: Optional[List[str]] = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and call `run(args)`; returns its exit code (None: 0). A ConfigError
    prints 'error: MESSAGE' on stderr and returns 2; argparse's own errors (already printed) return its code."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed the usage and the message (or --help): keep its code
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        code = run(args)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return EXIT_USAGE
    return 0 if code is None else code
