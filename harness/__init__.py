"""What the test suite and the bench both measure with; not part of initgate.

The round-trip counting proxy, the DDL event log and the URL helpers live
here, at the top of the repository, so that ``tests`` and ``bench`` import
one implementation without either importing the other. The package is not
installed with initgate (``pyproject.toml`` packages ``initgate`` and ``app``
only) and is no public API: it runs from a checkout, like the two users.
"""
