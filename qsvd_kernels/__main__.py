"""Command line: ``python -m qsvd_kernels {demo,info}``."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qsvd_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="decode with one compressed attention layer on the qsvd ops (offline, CPU)")
    sub.add_parser("info", help="print what this installation was built with (JSON)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import build_info

        print(json.dumps(build_info(), indent=2))
        return 0
    from .demo import run_demo

    run_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
