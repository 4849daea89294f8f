"""``python -m paper_figures`` == ``sfed-figures``."""

from paper_figures.make_figures import main

raise SystemExit(main())
