"""``python -m billing.cli``: the same as the ``billing`` command."""

from billing.cli import main

main()
