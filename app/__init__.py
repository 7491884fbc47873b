"""A small reference-data API (countries, currencies, languages) behind initgate.

It is the demo service: every worker of every replica passes through the gate
at startup, which migrates the database and loads the seed data exactly once.
Run it with ``uvicorn app.main:app --workers 4``.
"""
