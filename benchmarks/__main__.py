"""Entry point: `python -m benchmarks run|compare ...` (see benchmarks/cli.py)."""

import sys

from benchmarks.cli import main

sys.exit(main())
