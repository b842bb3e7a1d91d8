"""Evaluation: sweeps over α or level grids (``evaluate``), tables and plots (``report``), parameter
and MAC counts (``stats``) and the LEC baseline's pruning sweep (``prune``)."""
