"""The charge's life, split by role.

- ``lifecycle``: the table of allowed moves and the only code that writes a charge's state
  or a subscription's status, each move one conditional statement the database decides;
- ``rows``: the frozen rows those statements return (a charge, a subscription);
- ``sweep``: plan sweeps turn due periods into charge rows;
- ``dispatch``: due charges are handed to the workers, lost messages sent again;
- ``calls``: a charge's gateway call: claim, call, record (and late answers);
- ``settlement``: validation, release and refund calls;
- ``housekeeping``: calls whose worker died are marked unknown;
- ``context``: what every role shares (settings, plans, client, who acts).

``billing.engine.Engine`` puts them together for the task layer and the tests.
"""
