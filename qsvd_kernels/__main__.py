"""``python -m qsvd_kernels``: see qsvd_kernels/cli.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
