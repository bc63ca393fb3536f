"""A small shop that shows django-idempotency at work: ``python3 example_project/run.py``."""
