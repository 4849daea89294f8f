"""validation: the federated LoRA validation harness (real training, measured scaling laws).

Library API (data flows one way: config -> run -> tidy results -> analysis -> figure):

* :class:`validation.config.RunConfig`, :class:`validation.config.GridConfig`
* :func:`validation.federated.run` (one config -> DataFrame of rows)
* :func:`validation.grid.run_grid`, :func:`validation.grid.load_results`
* :func:`validation.analysis.fit_exponents`, :func:`validation.analysis.format_report`
* :func:`validation.plots.coordinate_check`
* CLI: ``sfed-validate`` / ``python -m validation`` (:func:`validation.cli.main`)
"""
