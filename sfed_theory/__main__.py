"""``python -m sfed_theory`` runs the sfed-theory command line."""

import sys

from sfed_theory.cli import main

sys.exit(main())
