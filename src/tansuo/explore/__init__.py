"""The explorer: search architecture x size x training x compression with Optuna, measure every variant,
find the Pareto front under constraints, report it and recommend one bundle (``tansuo explore``).

Modules: ``schema`` (the recipe's ``explore:`` section), ``trial`` (train, compress, measure one candidate),
``search`` (storage, sampler, the trial loop, resume and workers), ``pareto`` (fronts, constraints, the
recommendation), ``results`` (the study as one mapping; the best bundle), ``report`` (HTML, Markdown, JSON).
Optuna is imported here, never by ``import tansuo``.
"""
