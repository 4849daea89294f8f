"""``python -m validation`` == ``sfed-validate``."""

from validation.cli import main

raise SystemExit(main())
