"""Subscription re-billing for merchants on the Klik & Pay gateway.

The domain lives here, one module per concept; Celery only appears in ``tasks/``.
"""

__version__ = "0.1.0"
