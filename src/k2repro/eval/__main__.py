"""`python -m k2repro.eval PLAN.json RESULTS.json`: one rank of `k2repro eval --nproc N`."""

import sys

from k2repro.eval.runner import worker_main
from k2repro.logs import configure

configure("k2repro eval")
sys.exit(worker_main())
