"""Benchmarks: initgate against the alternatives, side by side.

``python -m bench`` runs every scenario on one PostgreSQL, prints a table and
writes ``bench/results/latest.json`` and ``latest.png``; see BENCHMARKS.md.
"""
