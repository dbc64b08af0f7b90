"""`torchrun --nproc-per-node N -m k2repro.train [overrides]` lands here."""

import sys

from k2repro.train.run import main

sys.exit(main())
