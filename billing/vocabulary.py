"""The words the product uses about charges, subscriptions and the ledger, in one place.

Every state, failure reason, review flag, ledger outcome and event type is written here
once, as an enum; the models, the lifecycle, the metrics labels, the CLI's help texts, the
reports and the events all read them from here. A new reason added here shows up in each
of them, and a typo in one of them is a name error rather than a silent new word.
"""

from __future__ import annotations

import enum


class ChargeState(enum.StrEnum):
    """Where a charge is. Only ``pending`` and ``queued`` charges are ever sent.

    The moves between them are the table in ``billing.charging.lifecycle``.
    """

    PENDING = "pending"  # waiting for next_attempt_at, then dispatched
    QUEUED = "queued"  # a task message is on its way
    IN_FLIGHT = "in_flight"  # claimed by a worker; a gateway call may be under way
    APPROVED = "approved"  # collected (or validated after a deferred authorization)
    AUTHORIZED = "authorized"  # deferred: authorized, waiting for validation
    FAILED = "failed"  # in the failed-charge queue: will not be sent again by itself
    UNKNOWN = "unknown"  # in the failed-charge queue: the card may have been charged
    DECLINED = "declined"  # a person recorded a decline; final
    DISCARDED = "discarded"  # given up: by a person, or the subscription was cancelled
    SKIPPED = "skipped"  # its period was written off (catch-up, or paused meanwhile)
    CANCELLED = "cancelled"  # an authorization released before validation


#: States a charge can still move from without a person.
OPEN_STATES = (ChargeState.PENDING, ChargeState.QUEUED, ChargeState.IN_FLIGHT)
#: States that wait for a person: the failed-charge queue (with flagged charges, below).
ATTENTION_STATES = (ChargeState.FAILED, ChargeState.UNKNOWN)
#: States in which the books hold the period's money (collected, or authorized).
PAID_STATES = (ChargeState.APPROVED, ChargeState.AUTHORIZED)


class SubscriptionStatus(enum.StrEnum):
    ACTIVE = "active"
    PAST_DUE = "past_due"
    SUSPENDED = "suspended"
    CANCELLED = "cancelled"
    PAUSED = "paused"


#: Subscriptions whose charges may be created and sent.
CHARGEABLE = (SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)


class Call(enum.StrEnum):
    """A gateway call, as the shop and the ledger's details name it."""

    CHARGE = "charge"  # duplicate.pl
    VALIDATE = "validate"  # validedifferee.pl
    RELEASE = "release"  # cancel_transaction.pl on an authorization
    REFUND = "refund"  # cancel_transaction.pl on collected money


#: Settlement calls (every call but the charge itself).
SETTLEMENT_CALLS = (Call.VALIDATE, Call.RELEASE, Call.REFUND)


class FailureReason(enum.StrEnum):
    """Why a charge waits in the failed-charge queue (``charges.reason``)."""

    HARD_DECLINE = "hard_decline"
    LADDER_EXHAUSTED = "ladder_exhausted"
    NOT_SENT_EXHAUSTED = "not_sent_exhausted"
    UNKNOWN_OUTCOME = "unknown_outcome"  # the answer was lost, cut or made no sense
    STUCK_IN_FLIGHT = "stuck_in_flight"  # the worker stopped during the call
    VELOCITY_GUARD = "velocity_guard"  # held: charged successfully too recently
    UNKNOWN_PLAN = "unknown_plan"  # held: its plan or account left the plans file
    LATE_APPROVAL = "late_approval"  # an earlier attempt's approval came after a retry began
    POISON = "poison"  # its message killed a worker past the delivery limit; never sent
    VALIDATE_DECLINED = "validate_declined"
    VALIDATE_NOT_SENT = "validate_not_sent"
    VALIDATE_UNKNOWN = "validate_unknown"
    RELEASE_DECLINED = "release_declined"
    RELEASE_NOT_SENT = "release_not_sent"
    RELEASE_UNKNOWN = "release_unknown"
    REFUND_UNKNOWN = "refund_unknown"

    @classmethod
    def of_call(cls, call: Call, what: str) -> FailureReason:
        """``validate`` + ``declined`` -> ``validate_declined``."""
        return cls(f"{call}_{what}")

    @property
    def call(self) -> Call:
        """The call this reason is about (``charge`` for the charge itself)."""
        head = self.value.split("_", 1)[0]
        return Call(head) if head in {c.value for c in SETTLEMENT_CALLS} else Call.CHARGE


#: Reasons of a settlement call whose answer was lost: a person resolves what it did.
SETTLEMENT_UNKNOWN = (
    FailureReason.VALIDATE_UNKNOWN,
    FailureReason.RELEASE_UNKNOWN,
    FailureReason.REFUND_UNKNOWN,
)
#: Reasons of a settlement call that failed for sure: a person's retry runs it again.
SETTLEMENT_FAILED = (
    FailureReason.VALIDATE_DECLINED,
    FailureReason.VALIDATE_NOT_SENT,
    FailureReason.RELEASE_DECLINED,
    FailureReason.RELEASE_NOT_SENT,
)
#: Why a charge was discarded without a person (not a queue reason).
SUBSCRIPTION_CANCELLED = "subscription_cancelled"


class Review(enum.StrEnum):
    """Why a person must look at a charge whatever its state (``charges.review``).

    The gateway said something the books do not: money moved that no row of ours
    collected, or not the amount asked. A charge can carry several flags (comma-separated):
    a new one never hides an older one. It stays in the failed-charge queue until a person
    has reconciled it (``billing failed review``), which clears the flags they saw.
    """

    LATE_APPROVAL = "late_approval"  # an attempt no longer current was approved
    POSSIBLE_DOUBLE_CHARGE = "possible_double_charge"  # ... and another attempt was too
    AMOUNT_MISMATCH = "amount_mismatch"  # approved, but not for the amount asked
    TX_REUSED = "tx_reused"  # approved with a transaction number another charge holds
    #: a person resolved it as approved, then the gateway's own answer for that attempt
    #: said no money moved (declined, or never received)
    RESOLUTION_CONTRADICTED = "resolution_contradicted"


#: Flags saying the card was charged for the period by an attempt the books do not hold:
#: such a charge is never sent again, discarded or resolved as declined.
LATE_FLAGS = (Review.LATE_APPROVAL, Review.POSSIBLE_DOUBLE_CHARGE)


class LedgerOutcome(enum.StrEnum):
    """What a ledger row records (``ledger.outcome``)."""

    # A gateway call's answer, on time.
    APPROVED = "approved"
    DECLINED = "declined"
    NOT_SENT = "not_sent"
    UNKNOWN = "unknown"
    AUTHORIZED = "authorized"
    VALIDATED = "validated"
    CANCELLED = "cancelled"  # an authorization released
    REFUNDED = "refunded"
    # An answer for an attempt that was no longer current: evidence, never money.
    LATE_ANSWER = "late_answer"
    # The engine, on its own.
    HELD = "held"
    SKIPPED = "skipped"
    DISCARDED = "discarded"
    # A person.
    RETRY_REQUESTED = "retry_requested"
    RESOLVED_APPROVED = "resolved_approved"
    RESOLVED_AUTHORIZED = "resolved_authorized"
    RESOLVED_DECLINED = "resolved_declined"
    RESOLVED_VALIDATED = "resolved_validated"
    RESOLVED_REFUNDED = "resolved_refunded"
    RESOLVED_CANCELLED = "resolved_cancelled"
    RESOLVED_VALIDATE_DECLINED = "resolved_validate_declined"
    RESOLVED_RELEASE_DECLINED = "resolved_release_declined"
    RESOLVED_REFUND_DECLINED = "resolved_refund_declined"
    REVIEWED = "reviewed"
    SUBSCRIPTION_PAUSED = "subscription_paused"
    SUBSCRIPTION_RESUMED = "subscription_resumed"
    SUBSCRIPTION_CANCELLED = "subscription_cancelled"
    SUBSCRIPTION_CARD_UPDATED = "subscription_card_updated"
    SUBSCRIPTION_PLAN_CHANGED = "subscription_plan_changed"
    SUBSCRIPTION_PRICE_CHANGED = "subscription_price_changed"


#: Ledger outcomes that move money into the merchant's account.
COLLECTED = (
    LedgerOutcome.APPROVED,
    LedgerOutcome.VALIDATED,
    LedgerOutcome.RESOLVED_APPROVED,
    LedgerOutcome.RESOLVED_VALIDATED,
)
#: Ledger outcomes that move money back to the customer.
REFUNDED = (LedgerOutcome.REFUNDED, LedgerOutcome.RESOLVED_REFUNDED)
#: Ledger outcomes of money held (deferred) but not collected: never counted as revenue.
AUTHORIZED = (LedgerOutcome.AUTHORIZED, LedgerOutcome.RESOLVED_AUTHORIZED)
#: Ledger outcome of an approved call of each kind.
APPROVED_OUTCOME = {
    Call.CHARGE: LedgerOutcome.APPROVED,
    Call.VALIDATE: LedgerOutcome.VALIDATED,
    Call.RELEASE: LedgerOutcome.CANCELLED,
    Call.REFUND: LedgerOutcome.REFUNDED,
}


class Operation(enum.StrEnum):
    """Who or what wrote a ledger row, or which script an attempt called."""

    DUPLICATE = "duplicate"
    VALIDATE = "validate"
    CANCEL = "cancel"
    PERSON = "person"
    ENGINE = "engine"


#: The script (ledger operation) of each call.
OPERATION_OF = {
    Call.CHARGE: Operation.DUPLICATE,
    Call.VALIDATE: Operation.VALIDATE,
    Call.RELEASE: Operation.CANCEL,
    Call.REFUND: Operation.CANCEL,
}


class EventType(enum.StrEnum):
    """What the shop is told, in the order the README documents them."""

    CHARGE_APPROVED = "charge.approved"
    CHARGE_AUTHORIZED = "charge.authorized"
    CHARGE_VALIDATED = "charge.validated"
    CHARGE_DECLINED = "charge.declined"
    CHARGE_FAILED = "charge.failed"
    CHARGE_UNKNOWN = "charge.unknown"
    CHARGE_RESOLVED = "charge.resolved"
    CHARGE_DISCARDED = "charge.discarded"
    CHARGE_SKIPPED = "charge.skipped"
    CHARGE_CANCELLED = "charge.cancelled"
    CHARGE_REFUNDED = "charge.refunded"
    SUBSCRIPTION_PAST_DUE = "subscription.past_due"
    SUBSCRIPTION_SUSPENDED = "subscription.suspended"
    SUBSCRIPTION_CANCELLED = "subscription.cancelled"
    SUBSCRIPTION_PAUSED = "subscription.paused"
    SUBSCRIPTION_REACTIVATED = "subscription.reactivated"
    SUBSCRIPTION_CARD_UPDATED = "subscription.card_updated"
    SUBSCRIPTION_PLAN_CHANGED = "subscription.plan_changed"
    SUBSCRIPTION_PRICE_CHANGED = "subscription.price_changed"


#: Subscription status -> the event of a subscription moving to it.
STATUS_EVENTS = {
    SubscriptionStatus.PAST_DUE: EventType.SUBSCRIPTION_PAST_DUE,
    SubscriptionStatus.SUSPENDED: EventType.SUBSCRIPTION_SUSPENDED,
    SubscriptionStatus.CANCELLED: EventType.SUBSCRIPTION_CANCELLED,
    SubscriptionStatus.PAUSED: EventType.SUBSCRIPTION_PAUSED,
    SubscriptionStatus.ACTIVE: EventType.SUBSCRIPTION_REACTIVATED,
}

#: Every reason a charge can be in the failed-charge queue for: its failure reasons and
#: its review flags. The metrics export each (0 when empty) and the CLI's help lists them.
QUEUE_REASONS: tuple[str, ...] = tuple(FailureReason) + tuple(Review)
