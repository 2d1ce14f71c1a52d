"""Every NATS subject, stream, consumer and KV bucket name the system uses, with the
parsers that read an id back out of a subject (nothing else splits a subject by hand).

Subjects run general to specific: ``llooma.v1.<domain>.<event>[.<id>]``.
"""

from __future__ import annotations

import hashlib
import re

_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

PREFIX = "llooma.v1"

# Request lifecycle: durable JetStream hand-offs between the control-plane services.
PIPELINE_STREAM = "LLOOMA_PIPELINE"
PIPELINE_SUBJECTS = f"{PREFIX}.pipeline.>"
PIPELINE_PRIVACY = f"{PREFIX}.pipeline.privacy"
PIPELINE_PLANNER = f"{PREFIX}.pipeline.planner"
PIPELINE_DISPATCHER = f"{PREFIX}.pipeline.dispatcher"
PIPELINE_RACER = f"{PREFIX}.pipeline.racer"
# Ingress -> any live racer: finish an answer whose racer stopped (RaceResume).
PIPELINE_RESUME = f"{PREFIX}.pipeline.resume"

# Settlement events from the racer to accounting.
SETTLEMENT_STREAM = "LLOOMA_SETTLEMENTS"
SETTLEMENT_SUBJECTS = f"{PREFIX}.settlement.>"
SETTLEMENT_TASK = f"{PREFIX}.settlement.task"
# Duel-and-judge outcomes (DuelResult) from the racer: accounting and the dispatcher.
SETTLEMENT_DUEL = f"{PREFIX}.settlement.duel"
# What each request's client received, from the ingress to accounting: the reports an
# ingress had ready together (DeliveryReports).
SETTLEMENT_DELIVERIES = f"{PREFIX}.settlement.deliveries"
# One report a message (DeliveryReport): what an ingress of an earlier version sends.
SETTLEMENT_DELIVERY = f"{PREFIX}.settlement.delivery"

# Race events from the racer: the dispatcher's host statistics, metrics, accounting.
EVENTS_STREAM = "LLOOMA_EVENTS"
EVENTS_SUBJECTS = f"{PREFIX}.event.>"
RACE_EVENT = f"{PREFIX}.event.race"
# Each ingress's requests and refusals (IngressTally), for every ingress's cluster-wide stats.
INGRESS_TALLY = f"{PREFIX}.event.ingress"

# Durable consumer names, one per consuming service (replicas share it).
CONSUMER_PRIVACY = "privacy"
CONSUMER_PLANNER = "planner"
CONSUMER_DISPATCHER = "dispatcher"
CONSUMER_RACER = "racer"
CONSUMER_RACER_RESUME = "racer-resume"
CONSUMER_ACCOUNTING = "accounting"
CONSUMER_ACCOUNTING_DUELS = "accounting-duels"
CONSUMER_ACCOUNTING_DELIVERIES = "accounting-deliveries"
CONSUMER_ACCOUNTING_DELIVERY_BATCHES = "accounting-delivery-batches"


def consumer_deliver(durable: str) -> str:
    """The fixed deliver subject of a durable push consumer: whichever replica (re)creates it,
    e.g. after a server restart lost it, every replica's queue subscription still receives."""
    return f"{PREFIX}.deliver.{checked_token(durable)}"


# Request-reply services on core NATS (queue groups).
COMPRESS = f"{PREFIX}.compress"
# Dispatcher -> aggregator: take over streaming a split request (AggregationStart).
AGGREGATE_START = f"{PREFIX}.aggregate.start"
# Aggregator -> dispatcher (queue group): run the rest of a DAG whose dispatcher died
# (DagResume -> DagResumed).
DAG_RESUME = f"{PREFIX}.dag.resume"

# Membership: KV buckets written by heartbeats; entries expire when heartbeats stop.
HOSTS_BUCKET = "llooma_hosts"
SERVICES_BUCKET = "llooma_services"
# Accounting's published state: balances per API key id (billing at the ingress) and the
# ledger summary (LedgerSummary under LEDGER_SUMMARY_KEY) for /v1/stats and metrics.
BALANCES_BUCKET = "llooma_balances"
# Written after accounting published every balance: from then on, a key absent from the
# bucket has none (until then the ingress cannot tell "no balance" from "not yet published").
BALANCES_COMPLETE_KEY = "all-published"
LEDGER_BUCKET = "llooma_ledger"
# A racer's record of each single-choice race it holds (RaceRecord, key = request id), for
# another racer to take over and settle if it dies.
RACES_BUCKET = "llooma_races"
# Each host's stake locked in the ledger (key = host id, value = micro-credits, ASCII), published
# by accounting; the dispatcher weights its draw by it.
STAKES_BUCKET = "llooma_stakes"
LEDGER_SUMMARY_KEY = "summary"
# API keys managed in Postgres, published by accounting: key = api_key_id (the keyed hash),
# value = the key's record (JSON); a revoked key's entry is deleted. Every ingress watches it.
KEYS_BUCKET = "llooma_api_keys"
# Key administration (create, list, update, revoke, usage): request-reply to accounting's key
# service, JSON bodies as in the admin HTTP API.
KEYS_ADMIN = f"{PREFIX}.keys.admin"

# Each sealed ledger block's height and id, outside the database: a stream that denies
# deletes and purges, one subject per chain and height, so `llooma ledger verify` catches a
# rewritten, re-signed or truncated chain. A chain is named by its signing key.
LEDGER_ANCHOR_STREAM = "LLOOMA_LEDGER_ANCHORS"
LEDGER_ANCHOR_SUBJECTS = f"{PREFIX}.ledger.anchor.>"
# The JetStream API requests that would change or remove the anchors (an update could lift
# the one-anchor-a-height rule or age them out): the server refuses them to the control
# plane's credential, so the process that signs blocks cannot undo their anchors; only the
# server's operator can (credentials.control_plane_user).
LEDGER_ANCHOR_GUARDED_API = tuple(
    f"$JS.API.STREAM.{request}.{LEDGER_ANCHOR_STREAM}"
    for request in ("UPDATE", "DELETE", "PURGE", "MSG.DELETE", "PEER.REMOVE", "RESTORE")
)


# Shared limits (llooma.limiter): one JetStream counter per scope and window, e.g. a key's
# requests per minute, held across every ingress; old windows age out of the stream.
LIMITS_STREAM = "LLOOMA_LIMITS"
LIMITS_SUBJECTS = f"{PREFIX}.limit.>"
# Where each limit scope's windows start (its first use), shared by every ingress.
LIMIT_PHASES_BUCKET = "llooma_limit_phases"


def limit_counter(scope: str, window: int) -> str:
    """`scope` is dot-free tokens such as "rpm.<api_key_id>"."""
    return f"{PREFIX}.limit.{scope}.{window}"


def ledger_chain(public_key: str) -> str:
    """A chain's name in anchor subjects: the start of its signing key (hex)."""
    return checked_token(public_key[:16])


def ledger_anchor(chain: str, height: int) -> str:
    return f"{PREFIX}.ledger.anchor.{chain}.{height}"


def ledger_anchors(chain: str) -> str:
    return f"{PREFIX}.ledger.anchor.{chain}.*"


def kv_put_subject(bucket: str, key: str) -> str:
    """The subject a plain publish uses to put a KV entry without a JetStream API call."""
    return f"$KV.{bucket}.{key}"


# Hot paths on core NATS: one subject per request or attempt under a per-instance wildcard.
def client_reply_prefix(ingress_instance: str) -> str:
    return f"{PREFIX}.reply.{ingress_instance}"


def client_reply(ingress_instance: str, request_id: str, generation: int = 0) -> str:
    """`generation` > 0: the subject of a resumed race (a new one at each resume, so events
    from a racer that was taken over are no longer routed)."""
    suffix = f"-{generation}" if generation else ""
    return f"{PREFIX}.reply.{ingress_instance}.{request_id}{suffix}"


def is_client_reply(subject: str) -> bool:
    return subject.startswith(f"{PREFIX}.reply.")


def client_reply_request_id(subject: str) -> str:
    """The request id of a `client_reply` subject."""
    return client_reply_route(subject)[0]


def client_reply_route(subject: str) -> tuple[str, int]:
    """The request id and generation of a `client_reply` subject."""
    request_id, _, generation = subject.rpartition(".")[2].partition("-")
    return request_id, int(generation) if generation.isdigit() else 0


def host_reply_prefix(racer_instance: str) -> str:
    return f"{PREFIX}.tokens.{racer_instance}"


def host_reply(racer_instance: str, attempt_id: str) -> str:
    return f"{PREFIX}.tokens.{racer_instance}.{attempt_id}"


# Every host chunk and every client event (the path-timing bench observes both).
HOST_REPLIES_ANY = f"{PREFIX}.tokens.>"
CLIENT_REPLIES_ANY = f"{PREFIX}.reply.>"


def host_reply_attempt_id(subject: str) -> str:
    """The attempt id of a `host_reply` subject."""
    return subject.rpartition(".")[2]


def model_token(model: str) -> str:
    """A subject-safe token for a model name ("org/name-3.1" has dots and slashes)."""
    if _SAFE_TOKEN.match(model):
        return model
    return "m_" + hashlib.sha256(model.encode()).hexdigest()[:24]


def host_task(model: str, host_id: str) -> str:
    """Capability subject: tasks for one model on one host."""
    return f"{PREFIX}.cap.{model_token(model)}.{host_id}"


def host_tasks_any_model(host_id: str) -> str:
    """Wildcard over every capability subject of one host (for its permissions)."""
    return f"{PREFIX}.cap.*.{host_id}"


def host_cancel(host_id: str) -> str:
    return f"{PREFIX}.host.{host_id}.cancel"


# Hosts live in a NATS account of their own (see credentials.py): these are the only subjects
# that cross between it and the control plane's account.
HOST_TASKS_ANY = f"{PREFIX}.cap.>"
HOST_CANCEL_ANY = f"{PREFIX}.host.*.cancel"
HOST_HEARTBEAT_ANY = f"{PREFIX}.heartbeat.host.*"
# The server's advisory when a connection in the hosts account closes (a crash, a kill, a
# revocation), naming the host the auth callout admitted it as (`client.user`); the system
# account exports it to the control plane's (`credentials.accounts_block`).
HOSTS_DISCONNECTED = "$SYS.ACCOUNT.HOSTS.DISCONNECT"


def host_heartbeat(host_id: str) -> str:
    """Where a host sends its heartbeat; a control-plane service validates it and writes the
    hosts bucket (a host never writes a bucket itself)."""
    return f"{PREFIX}.heartbeat.host.{host_id}"


def checked_token(value: str) -> str:
    """Return value if it is safe as one subject token (host ids, instance ids), else raise."""
    if not _SAFE_TOKEN.match(value):
        raise ValueError(f"not a valid subject token (letters, digits, - and _): {value!r}")
    return value


def aggregation_nodes(aggregator_instance: str, request_id: str) -> str:
    """Prefix of the subjects on which a split request's node races report to the aggregator."""
    return f"{PREFIX}.agg.{aggregator_instance}.{request_id}"


def aggregation_node(nodes_prefix: str, node_id: str) -> str:
    """Where one node's race reports, under the prefix `aggregation_nodes` gave."""
    return f"{nodes_prefix}.{node_id}"


def aggregation_any(aggregator_instance: str) -> str:
    return f"{PREFIX}.agg.{aggregator_instance}.*.*"


def aggregation_node_resumed(
    aggregator_instance: str, request_id: str, node_id: str, generation: int
) -> str:
    """Where a node's race reports once its racer stopped and another resumes it (the
    `generation`-th time): a new subject, so the stopped racer, if only slow, is not heard."""
    return f"{PREFIX}.agg.{aggregator_instance}.{request_id}~{generation}.{node_id}"


def aggregation_node_ids(subject: str) -> tuple[str, str, int]:
    """(request id, node id, generation: 0 for the node's first race) of an
    `aggregation_node` or `aggregation_node_resumed` subject."""
    _, _, request_token, node_id = subject.rsplit(".", 3)
    request_id, _, generation = request_token.partition("~")
    return request_id, node_id, int(generation) if generation.isdigit() else 0


def planner_reply(planner_instance: str, call_id: str) -> str:
    """Where a planner instance's split call is answered (one subject per call)."""
    return f"{PREFIX}.planner.{planner_instance}.{call_id}"


def node_done(dispatcher_instance: str) -> str:
    """Where the aggregator reports finished nodes to the dispatcher running the DAG."""
    return f"{PREFIX}.dag.{dispatcher_instance}.done"


def node_done_dispatcher(subject: str) -> str:
    """The dispatcher instance of a `node_done` subject."""
    return subject.rsplit(".", 2)[1]


def request_cancel(request_id: str) -> str:
    """The ingress says the client went away; the racer holding the request stops its hosts."""
    return f"{PREFIX}.request.{request_id}.cancel"


def request_cancel_request_id(subject: str) -> str:
    """The request id of a `request_cancel` subject."""
    return subject.rsplit(".", 2)[1]


REQUEST_CANCEL_ANY = f"{PREFIX}.request.*.cancel"

# NATS's own: the auth callout the server asks about each host connection (answered in the
# control plane's account), and the system account's requests that find and close a
# connection on every server of a cluster (`llooma hosts revoke`).
AUTH_CALLOUT = "$SYS.REQ.USER.AUTH"
SERVERS_CONNZ = "$SYS.REQ.SERVER.PING.CONNZ"


def server_kick(server_id: str) -> str:
    return f"$SYS.REQ.SERVER.{server_id}.KICK"
