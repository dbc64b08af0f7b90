import sys

from k2repro.cli.main import main

sys.exit(main())
