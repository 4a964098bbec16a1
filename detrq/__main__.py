"""Entry point for ``python -m detrq``."""

import sys

from detrq.cli import main

sys.exit(main())
