"""Command-line interface (being built; see README)."""

import sys


def main(argv=None) -> int:
    print("diffrestore: CLI under construction", file=sys.stderr)
    return 2
