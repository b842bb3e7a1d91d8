"""Evaluation: sweeps over α or level grids (``evaluate``), tables, plots and heat maps (``report``)
and the LEC baseline's pruning sweep (``prune``)."""
