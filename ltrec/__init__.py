"""Modelling code shared by training, evaluation, export scripts and tests."""
