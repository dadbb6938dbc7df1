"""``python -m kvpr`` runs the CLI (for machines where the console script is not installed)."""

import sys

from kvpr.cli import main

sys.exit(main())
