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

# A duel lost "unanimously" needs at least this many judges who voted, all against the loser.
UNANIMOUS_MIN_JUDGES = 2

PLATFORM = "platform:revenue"
FALLBACK = "fallback:pool"
TREASURY = "treasury:deposits"


def user_account(api_key_id: str) -> str:
    return f"user:{api_key_id}"


def host_account(host_id: str) -> str:
    return f"host:{host_id}"


def stake_account(host_id: str) -> str:
    """The credits a host has locked: its weight in the dispatcher's draw, and what a slash
    takes from."""
    return f"stake:{host_id}"


STAKE_PREFIX = stake_account("")


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


# -- stake and slashing ----------------------------------------------------------------------


def lock_stake(txn_id: str, host_id: str, amount: int, funding: str) -> Posting:
    """Lock `amount` of `funding` (the treasury, or the host's own earnings) as the host's
    stake."""
    if amount <= 0:
        raise ValueError("a stake must be positive")
    legs = _transfer(funding, stake_account(host_id), amount, "stake")
    return Posting(txn_id, host_id, tuple(legs))


def release_txn_id(unlock_txn_id: str) -> str:
    return f"release:{unlock_txn_id}"


def release_stake(unlock_txn_id: str, host_id: str, asked: int, locked: int) -> Posting:
    """Pay an unlock out of the stake to the host's account: what was asked, or what is left
    of the stake if slashes took the rest meanwhile."""
    amount = max(0, min(asked, locked))
    legs = _transfer(stake_account(host_id), host_account(host_id), amount, "unstake")
    return Posting(release_txn_id(unlock_txn_id), host_id, tuple(legs))


@dataclass(frozen=True, slots=True)
class SlashRules:
    """When and how much of a host's locked stake is slashed (all from settings)."""

    # Consecutive no-shows (TaskSettlement.no_show) that cost a slash; 0: never.
    no_show_streak: int = 3
    no_show_fraction: Fraction = Fraction(1, 10)
    duel_fraction: Fraction = Fraction(1, 20)
    # Per usage over-claim (TaskSettlement.usage_overclaimed): no honest engine's count goes
    # past the slack, so there is no streak to wait for.
    usage_fraction: Fraction = Fraction(1, 50)

    @classmethod
    def from_settings(cls, settings: Settings) -> SlashRules:
        return cls(
            no_show_streak=settings.slash_no_show_streak,
            no_show_fraction=Fraction(str(settings.slash_no_show_fraction)),
            duel_fraction=Fraction(str(settings.slash_duel_fraction)),
            usage_fraction=Fraction(str(settings.slash_usage_fraction)),
        )


def slash(
    txn_id: str, ref: str, host_id: str, locked: int, fraction: Fraction, reason: str
) -> Posting:
    """Move `fraction` of the host's locked stake to the platform, the reason as the legs'
    kind (`slash:<reason>`); nothing when it has no stake."""
    amount = int(fraction * max(locked, 0))
    legs = _transfer(stake_account(host_id), PLATFORM, amount, f"slash:{reason}")
    return Posting(txn_id, ref, tuple(legs))


@dataclass
class NoShowSlashes:
    """The outcome of folding a batch's attempts into each host's no-show streak."""

    postings: list[Posting]
    streaks: dict[str, int]
    no_shows: dict[str, int]


def slash_no_shows(
    rules: SlashRules,
    settlements: Iterable[TaskSettlement],
    streaks: dict[str, int],
    locked: dict[str, int],
) -> NoShowSlashes:
    """Each no-show lengthens its host's streak and a first token ends it; a streak reaching
    `rules.no_show_streak` costs the host `no_show_fraction` of its stake and starts again.
    The slash is named after the attempt that completed the streak, so it posts once.
    `locked` is updated with what the slashes leave."""
    streaks = dict(streaks)
    no_shows: dict[str, int] = {}
    postings: list[Posting] = []
    for s in settlements:
        host = s.host_id
        if s.no_show:
            no_shows[host] = no_shows.get(host, 0) + 1
            streaks[host] = streaks.get(host, 0) + 1
            if rules.no_show_streak and streaks[host] >= rules.no_show_streak:
                streaks[host] = 0
                posting = slash(
                    f"slash:no_show:{s.attempt_id}",
                    s.attempt_id,
                    host,
                    locked.get(host, 0),
                    rules.no_show_fraction,
                    "no_show",
                )
                if posting.legs:
                    locked[host] = locked.get(host, 0) + posting.legs[0].amount
                    postings.append(posting)
        elif s.usage.output_tokens > 0 or s.delivered_tokens > 0:
            streaks[host] = 0
    return NoShowSlashes(postings, streaks, no_shows)


def slash_usage_claims(
    rules: SlashRules, settlements: Iterable[TaskSettlement], locked: dict[str, int]
) -> list[Posting]:
    """Each attempt whose usage claim broke the usage rule costs its host `usage_fraction` of
    its stake (`slash:usage:<attempt>`, so a redelivery posts nothing); `locked` is updated."""
    postings: list[Posting] = []
    for s in settlements:
        if not s.usage_overclaimed:
            continue
        posting = slash(
            f"slash:usage:{s.attempt_id}",
            s.attempt_id,
            s.host_id,
            locked.get(s.host_id, 0),
            rules.usage_fraction,
            "usage",
        )
        if posting.legs:
            locked[s.host_id] = locked.get(s.host_id, 0) + posting.legs[0].amount
            postings.append(posting)
    return postings


def unanimous_loser(duel: DuelResult) -> str | None:
    """The duel's loser if at least UNANIMOUS_MIN_JUDGES judges voted and every verdict they
    gave (in both orders, as aggregated) named the winner; else None."""
    loser = {DUEL_VERDICT_A: duel.host_b, DUEL_VERDICT_B: duel.host_a}.get(duel.outcome)
    if loser is None:
        return None
    duelists = (duel.host_a, duel.host_b)
    voted = 0
    for vote in duel.votes:
        if vote.judge_host_id in duelists:
            continue
        verdicts = [
            v
            for v in (vote.verdict_in_order, vote.verdict_swapped)
            if v != DUEL_VERDICT_UNSPECIFIED
        ]
        if not verdicts:
            continue
        if any(v != duel.outcome for v in verdicts):
            return None
        voted += 1
    return loser if voted >= UNANIMOUS_MIN_JUDGES else None


def slash_duel(rules: SlashRules, duel: DuelResult, locked: dict[str, int]) -> Posting | None:
    """A duel lost unanimously costs the loser `duel_fraction` of its stake (beside the duel
    penalty from its earnings); `locked` is updated."""
    loser = unanimous_loser(duel)
    if loser is None:
        return None
    posting = slash(
        f"slash:duel:{duel.duel_id}",
        duel.duel_id,
        loser,
        locked.get(loser, 0),
        rules.duel_fraction,
        "duel",
    )
    if not posting.legs:
        return None
    locked[loser] = locked.get(loser, 0) + posting.legs[0].amount
    return posting
