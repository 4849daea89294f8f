"""Paper figures for sfed: every figure regenerated from stored results and the theory API.

``sfed-figures`` (or ``python -m paper_figures``) draws all of them; ``--rerun`` first re-runs
the experiments that feed them. See :mod:`paper_figures.make_figures`.
"""

__all__ = ["make_figures", "experiments", "empirical_figs", "theory_figs", "style"]
