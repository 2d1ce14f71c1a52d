"""The paper's economics (section IV) as pure arithmetic on integer micro-credits.

Every posting is a balanced transaction: its legs sum to zero, and it is identified by a
transaction id derived from what it settles, so posting it twice is impossible.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction

from llooma.settings import DEV_API_KEY, Settings, api_key_id
from llooma.v1.duel_pb2 import DUEL_VERDICT_A, DUEL_VERDICT_B, DUEL_VERDICT_UNSPECIFIED, DuelResult
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_LOST, ATTEMPT_OUTCOME_WON, TaskSettlement

PLATFORM = "platform:revenue"
FALLBACK = "fallback:pool"
TREASURY = "treasury:deposits"


def user_account(api_key_id: str) -> str:
    return f"user:{api_key_id}"


def host_account(host_id: str) -> str:
    return f"host:{host_id}"


@dataclass(frozen=True, slots=True)
class Leg:
    account: str
    amount: int
    kind: str


@dataclass(frozen=True, slots=True)
class Posting:
    """One balanced transaction."""

    txn_id: str
    ref: str
    legs: tuple[Leg, ...]

    def __post_init__(self) -> None:
        if sum(leg.amount for leg in self.legs) != 0:
            raise ValueError(f"transaction {self.txn_id} does not sum to zero")


def _transfer(payer: str, payee: str, amount: int, kind: str) -> list[Leg]:
    """Both legs of moving `amount` from payer to payee; nothing when the amount is zero."""
    if amount == 0:
        return []
    return [Leg(payer, -amount, kind), Leg(payee, amount, kind)]


@dataclass(frozen=True, slots=True)
class Prices:
    """The published price list and payout policy (all from settings)."""

    user: int = 20
    host: int = 10
    reservation_fee: int = 20
    progress_fee: int = 2
    eta: Fraction = Fraction(3, 20)
    fallback: int = 30
    duel_reward: int = 500
    duel_penalty: int = 500
    judge_fee: int = 100
    user_by_model: dict[str, int] = field(default_factory=dict)
    host_by_model: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Prices:
        return cls(
            user=settings.user_price_micros,
            host=settings.host_price_micros,
            reservation_fee=settings.loser_reservation_fee_micros,
            progress_fee=settings.loser_progress_fee_micros,
            # Exact: 0.15 as a float would round some caps down by one micro-credit.
            eta=Fraction(str(settings.loser_cap_eta)),
            fallback=settings.fallback_price_micros,
            duel_reward=settings.duel_reward_micros,
            duel_penalty=settings.duel_penalty_micros,
            judge_fee=settings.judge_fee_micros,
            user_by_model=dict(settings.user_price_micros_by_model),
            host_by_model=dict(settings.host_price_micros_by_model),
        )

    def user_charge(self, model: str, tokens: int) -> int:
        return self.user_by_model.get(model, self.user) * tokens

    def winner_payout(self, model: str, output_tokens: int, *, fallback: bool) -> int:
        """The completion payout: per output token at the model's price, or the fallback's."""
        price = self.fallback if fallback else self.host_by_model.get(model, self.host)
        return price * output_tokens

    def loser_fee(self, output_tokens: int, winner_payout: int, *, reserved: bool) -> int:
        """Reservation fee (if the host kept its commitment) plus a progress fee per token,
        together capped at eta of the winner's payout; nothing when no one won."""
        uncapped = (self.reservation_fee if reserved else 0) + self.progress_fee * output_tokens
        return min(uncapped, int(self.eta * winner_payout))


def payee(settlement: TaskSettlement) -> str:
    return FALLBACK if settlement.fallback else host_account(settlement.host_id)


def attempt_txn_id(attempt_id: str) -> str:
    return f"attempt:{attempt_id}"


def settle_attempt(prices: Prices, s: TaskSettlement) -> Posting:
    """What one attempt earns and, for the winner, what the user pays."""
    legs: list[Leg] = []
    tokens = s.usage.output_tokens
    if s.outcome == ATTEMPT_OUTCOME_WON and s.delivered_tokens:
        # Paid and charged for no more than the racer relayed, whatever the host claims.
        tokens = min(tokens, s.delivered_tokens)
    if s.outcome == ATTEMPT_OUTCOME_WON:
        paid = prices.winner_payout(s.model, tokens, fallback=s.fallback)
        legs += _transfer(PLATFORM, payee(s), paid, "fallback" if s.fallback else "payout")
        if s.api_key_id:
            # The user pays for the model asked for, whichever model served it.
            charge = prices.user_charge(s.requested_model or s.model, s.usage.input_tokens + tokens)
            legs += _transfer(user_account(s.api_key_id), PLATFORM, charge, "charge")
    else:
        winner_paid = prices.winner_payout(
            s.winner_model, s.winner_output_tokens, fallback=s.winner_fallback
        )
        # The reservation fee is for a commitment kept: a host that never accepted, failed,
        # stalled or broke a rule (violations) keeps only its progress fee. Nor is a host
        # paid for accepting alone: one that accepted every task and never sent a token
        # would otherwise earn a fee from every race it was drawn into (docs/SECURITY.md).
        reserved = (
            s.outcome == ATTEMPT_OUTCOME_LOST and s.accepted and not s.violations and tokens > 0
        )
        fee = prices.loser_fee(tokens, winner_paid, reserved=reserved)
        legs += _transfer(PLATFORM, payee(s), fee, "fallback" if s.fallback else "loser_fee")
    return Posting(attempt_txn_id(s.attempt_id), s.attempt_id, tuple(legs))


def duel_txn_id(duel_id: str) -> str:
    return f"duel:{duel_id}"


def voted_judges(duel: DuelResult) -> list[str]:
    """Judges that returned at least one verdict: only they are paid."""
    duelists = (duel.host_a, duel.host_b)
    return [
        vote.judge_host_id
        for vote in duel.votes
        if vote.judge_host_id not in duelists
        and (vote.verdict_in_order, vote.verdict_swapped)
        != (DUEL_VERDICT_UNSPECIFIED, DUEL_VERDICT_UNSPECIFIED)
    ]


def settle_duel(prices: Prices, duel: DuelResult) -> Posting:
    """WWW.Serve 4.2: the better answer's host is rewarded, the worse one's penalized, and
    every judge that voted is paid; a tie moves nothing between the duelists."""
    legs: list[Leg] = []
    winner_loser = {
        DUEL_VERDICT_A: (duel.host_a, duel.host_b),
        DUEL_VERDICT_B: (duel.host_b, duel.host_a),
    }.get(duel.outcome)
    if winner_loser is not None:
        winner, loser = winner_loser
        legs += _transfer(PLATFORM, host_account(winner), prices.duel_reward, "duel_reward")
        legs += _transfer(host_account(loser), PLATFORM, prices.duel_penalty, "duel_penalty")
    for judge in voted_judges(duel):
        legs += _transfer(PLATFORM, host_account(judge), prices.judge_fee, "judge_fee")
    return Posting(duel_txn_id(duel.duel_id), duel.duel_id, tuple(legs))


def deposit(txn_id: str, api_key_id: str, amount: int) -> Posting:
    """Credit a user from outside the system (an opening balance or a top-up)."""
    return Posting(
        txn_id, api_key_id, tuple(_transfer(TREASURY, user_account(api_key_id), amount, "deposit"))
    )


def opening_txn_id(api_key_id: str) -> str:
    return f"open:{api_key_id}"


def account_deltas(postings: Iterable[Posting]) -> dict[str, int]:
    deltas: dict[str, int] = {}
    for posting in postings:
        for leg in posting.legs:
            deltas[leg.account] = deltas.get(leg.account, 0) + leg.amount
    return deltas


def user_charges(postings: Iterable[Posting]) -> int:
    """What the users paid in these postings: the totals are read off the legs posted, never
    priced a second time."""
    return sum(
        leg.amount
        for posting in postings
        for leg in posting.legs
        if leg.kind == "charge" and leg.account == PLATFORM
    )


def opening_balances(settings: Settings) -> dict[str, int]:
    """Each configured key's opening balance, by api_key_id (the raw key is never stored)."""
    return {
        api_key_id(key): settings.opening_balances_micros.get(
            key,
            settings.dev_key_opening_balance_micros
            if key == DEV_API_KEY
            else settings.opening_balance_micros,
        )
        for key in settings.api_keys
    }
