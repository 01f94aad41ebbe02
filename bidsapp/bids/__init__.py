"""BIDS input and output: find the preprocessed BOLD runs, validate them, write derivatives.

Import from the modules: ``layout`` (discovery), ``validation`` and ``derivatives``; the package
re-exports nothing.
"""
