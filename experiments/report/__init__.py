"""The evaluation report: our model, its ablations and the baselines on one leave-one-out split
(`settings` describes the modules; `python -m experiments.report` runs it)."""
