"""Fault and abuse runs of the whole system, and the checks that judge them.

- ``python -m chaos.run`` (``make chaos``, ``make chaos-small``): thousands of due
  subscriptions charged by three worker processes and two beats while workers are killed,
  Redis restarts, PostgreSQL connections are cut and the sandbox misbehaves; then the
  sandbox's call log is set beside the ledger (``chaos.reconcile``).
- ``chaos.scan``: looks for card numbers, CVVs and private keys in log files and in a
  dump of every database table (``python -m chaos.scan``).
"""
