"""What tracing costs: bench/observability.py with ``--kind tracing`` (see its docstring).

    python bench/tracing.py            # ~5 minutes: tracing off, at 0.001 and at 1.0, gRPC and HTTP
    python bench/tracing.py --quick

Writes bench/results/tracing.json, bench/results/tracing.md and docs/bench-tracing.png.
"""

from __future__ import annotations

import sys

from observability import main

if __name__ == "__main__":
    sys.exit(main(["--kind", "tracing", *sys.argv[1:]]))
