"""Benchmarks: the bridge against Ray Serve's own async inference and a direct call.

``python -m bench run`` (see ``bench/cli.py``); the report is ``bench/REPORT.md``.
"""
