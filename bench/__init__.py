"""Benchmarks, kept out of the package: run them as scripts from the repository root.

``request_bench.py`` times one protected request in process, ``http_bench.py`` under load through
gunicorn; both compare the bare view, the package (``ours``) and ``floor.py``, a hand-written
minimal implementation of the same contract that tells how low the cost can go.
"""
