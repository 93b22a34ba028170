"""Runnable examples. A regular package, so that `examples.digits:DigitsCNN` resolves to these files even when
another installed distribution ships a top-level `examples` package (kronfluence does)."""
