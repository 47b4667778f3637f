"""The processes and services a run of this project starts on one machine, in one place.

Tests, ``make bench``, ``make chaos`` and ``billing demo`` all need the same things: a free
loopback port, a Redis server of their own, a fresh database at the head migration, the
sandbox gateway in a process of its own with a client of its control API, and workers and
beats started with the commands a user runs. Each used to write its own; the copies had
drifted apart (one waited for readiness, one did not; one killed a prefork worker's
children, one left them running). This package is the one copy, shipped in the wheel so
that ``billing demo`` can use it.

- ``ports``: a free loopback port;
- ``redis``: a private ``redis-server`` (start, kill, restart, stop, URL);
- ``databases``: a PostgreSQL database or SQLite file at the head migration, and dropping it;
- ``sandbox``: ``billing sandbox`` as a process, and the client of its ``/_sandbox/`` API;
- ``workers``: worker and beat processes, each in its own process group, logging to files;
- ``base``: what they share: the error they raise, waiting for a condition, stopping a
  process group.

Nothing here mocks anything: every service is the real program, on loopback.
"""
