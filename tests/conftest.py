"""Session-wide test settings."""

from __future__ import annotations

import os
import tempfile


def pytest_configure(config):
    # One form store per test session, shared with the notebooks and scripts the tests start (they inherit
    # the environment): every run derives each closed form once, whatever an earlier run left in ~/.cache.
    if "SFED_FORM_CACHE" not in os.environ:
        os.environ["SFED_FORM_CACHE"] = tempfile.mkdtemp(prefix="sfed_forms_")
