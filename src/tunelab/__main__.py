"""`python -m tunelab` runs the CLI."""

import sys

from tunelab.cli import main

sys.exit(main())
