"""`python -m graphprune ...` runs the command line (same as the `graphprune` script)."""

import sys

from .cli.main import main

sys.exit(main())
