"""`python -m wiola` runs the command line (also under torchrun)."""

import sys

from wiola.cli import main

sys.exit(main())
