"""Experiments: the evaluation report (`experiments.report`). They may import everything (the
modelling package, the export, the core); nothing imports them."""
