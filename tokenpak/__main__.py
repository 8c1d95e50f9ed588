"""`python -m tokenpak`: the same as the `tokenpak` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
