"""Helpers the test modules share: fakes, fixtures' building blocks, small files on disk.

Test modules import from here, never from each other; `tests/conftest.py` registers the shared
fixtures.
"""
