"""Host selection, in the shape of llm-d's scheduler: which hosts may serve a request, how
good each is, and which ones race it. One pipeline, used by the dispatcher (races and
fallbacks), the ingress (admission capacity, the metrics' host table), the planner (independent
engines for L_split) and the racer (duel judges).

1. Filters narrow the hosts bucket to endpoints, one model on one host. Host filters:
   `not_suspended` (settings.suspended_hosts), `not_draining`, `min_version`, `fresh`
   (heartbeat at most host_stale_after_s old, or the wait the host announced plus a grace
   when longer: `silence_allowed_s`). Model filters: `serves_model` (any model for
   the orchestrated `llooma`), `not_excluded` (orchestration_excluded_models never answer
   `llooma`), `engine_reachable` (ModelCapability.engine_unreachable), `capable` (every
   ModelFeatures field the request uses, a set of names the caller passes in `Ask.features`).
2. Named scorers give each endpoint a term in [0, 1] (clamped), lower is better: `load`,
   `latency_p95`, `staleness`, `error_rate`, `quality_deficit`; S(h) is their sum weighted by
   settings.score_weights and duel_quality_weight. A new term is one scorer in `SCORERS`, a
   weight, and its test; the metrics' host table shows every term by name.
3. The picker draws k distinct hosts by stake from the `best_bucket_size` best scores; with a
   view of the ledger's stakes (the dispatcher's), a host's stake is `ledger_stake`: what it
   announced, capped at what it has locked (or settings.unstaked_host_stake if more).

Capacity counts each engine once: models and hosts announcing one `engine_id` share one
engine (admission's capacity, the planner's parallelism).
"""

from llooma.selection._capacity import capacity, engine_key, independent_engines
from llooma.selection._filters import (
    HOST_FILTERS,
    MODEL_FILTERS,
    NEXT_BEAT_GRACE_S,
    Ask,
    Endpoint,
    Host,
    HostEntry,
    HostFilter,
    ModelFilter,
    Policy,
    as_host,
    asked_features,
    capable,
    endpoints,
    engine_reachable,
    fresh,
    host_rejection,
    min_version,
    not_draining,
    not_excluded,
    not_suspended,
    serves_model,
    silence_allowed_s,
    version_tuple,
)
from llooma.selection._picker import Candidate, ledger_stake, pick_hosts
from llooma.selection._pipeline import Selector
from llooma.selection._scorers import (
    DEFAULT_WEIGHTS,
    SCORERS,
    UNKNOWN_LATENCY_TERM,
    Context,
    NothingObserved,
    Observed,
    Scorer,
    clamp01,
    error_rate,
    latency_p95,
    load,
    quality_deficit,
    score_terms,
    staleness,
    weighted,
    weights_from_settings,
)

__all__ = [
    "DEFAULT_WEIGHTS",
    "HOST_FILTERS",
    "MODEL_FILTERS",
    "NEXT_BEAT_GRACE_S",
    "SCORERS",
    "UNKNOWN_LATENCY_TERM",
    "Ask",
    "Candidate",
    "Context",
    "Endpoint",
    "Host",
    "HostEntry",
    "HostFilter",
    "ModelFilter",
    "NothingObserved",
    "Observed",
    "Policy",
    "Scorer",
    "Selector",
    "as_host",
    "asked_features",
    "capable",
    "capacity",
    "clamp01",
    "endpoints",
    "engine_key",
    "engine_reachable",
    "error_rate",
    "fresh",
    "host_rejection",
    "independent_engines",
    "latency_p95",
    "ledger_stake",
    "load",
    "min_version",
    "not_draining",
    "not_excluded",
    "not_suspended",
    "pick_hosts",
    "quality_deficit",
    "score_terms",
    "serves_model",
    "silence_allowed_s",
    "staleness",
    "version_tuple",
    "weighted",
    "weights_from_settings",
]
