"""Integrations with optional libraries; each module imports its library only when imported."""
