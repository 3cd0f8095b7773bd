"""``python -m batchgate.loadtest.autoscale``: see :func:`batchgate.loadtest.autoscale.report.main`."""

import sys

from .report import main

sys.exit(main())
