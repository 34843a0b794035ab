"""`python -m graphprune ...` runs the command line (same as the `graphprune` script)."""

import sys

from .cli import main

sys.exit(main())
