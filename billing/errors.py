"""The one exception tree of the project.

Every error a user can meet derives from :class:`BillingError`; its message names the
problem and where it is, and never carries a card number, a CVV or a private key.
"""

from __future__ import annotations


class BillingError(Exception):
    """Base class of every error this project raises on purpose."""

    #: Exit status of the CLI when this error stops a command.
    exit_code = 1


class ConfigError(BillingError):
    """A setting, an environment variable or the plans file is invalid."""

    exit_code = 2


class PlanFileError(ConfigError):
    """The plans file cannot be used; ``problems`` lists each named problem."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


class InvalidInput(BillingError):
    """An argument is invalid; nothing was sent and nothing was written."""

    exit_code = 2


class ImportRejected(InvalidInput):
    """An import file has bad rows; ``problems`` lists them and nothing was written."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} bad row(s): " + "; ".join(problems[:20]))


class NotFound(BillingError):
    """A subscription, charge or record named by the user does not exist."""

    exit_code = 2


class StateError(BillingError):
    """The action does not fit the record's current state (e.g. retrying an approved charge)."""

    exit_code = 2


class GatewayAnswerError(BillingError):
    """An answer from the gateway cannot be understood (the outcome is UNKNOWN)."""
