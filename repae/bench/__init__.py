"""``python -m repae.bench``: our REPA-E joint step timed against the reference formulation (see :mod:`.joint`)."""
