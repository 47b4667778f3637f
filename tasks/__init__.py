"""Celery tasks: thin wrappers that unpack arguments and call ``billing``.

``celery -A tasks worker`` finds the app here.
"""

from tasks.app import app

__all__ = ["app"]
