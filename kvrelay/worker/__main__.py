"""`python -m kvrelay.worker ...`: the worker process `kvrelay serve` starts."""

from __future__ import annotations

import sys

from kvrelay.worker.main import worker_main

sys.exit(worker_main())
