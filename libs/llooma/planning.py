"""The planner's pure logic (paper II-A): a deterministic bypass gate, structural
decomposition into a task DAG, plan validation, and the L_split + eps < L_dir estimate."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llooma.v1.pipeline_pb2 import ChatRequest
from llooma.v1.plan_pb2 import (
    PLAN_KIND_BYPASS,
    PLAN_KIND_DIRECT,
    PLAN_KIND_SPLIT,
    PLAN_KIND_UNSPECIFIED,
    Plan,
    PlanNode,
)

if TYPE_CHECKING:
    from llooma.settings import Settings

_ITEM = re.compile(r"^\s*((?:\d{1,2}[.)])|(?:[a-z][.)])|[-*•])\s+(\S.*)$")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_DEPENDENCY = re.compile(
    r"\b(using (?:the|that|this|those|these) (?:result|output|answer|list)s?|"
    r"based on (?:the|that|this) (?:above|result|previous|answer)|"
    r"from (?:the )?(?:previous|above) (?:step|part|answer)|then use (?:it|that|them))\b",
    re.IGNORECASE,
)
_THEN = re.compile(r"(?:^|(?<=[.!?]\s))(?:then|next|after that|afterwards)\s*,?\s+", re.IGNORECASE)


# The `decision` of a split plan (and of the x-llooma-plan header of a split answer).
SPLIT_DECISION = "split"


def bypass_plan(reason: str) -> Plan:
    """Kept off the split path before any planning: stage 1, the client, or the model."""
    return Plan(kind=PLAN_KIND_BYPASS, decision=f"bypass: {reason}")


def direct_plan(reason: str, source: str = "") -> Plan:
    return Plan(kind=PLAN_KIND_DIRECT, decision=f"direct: {reason}", source=source)


def decide(plan: Plan, *, split: bool, reason: str = "") -> None:
    """Record the choice on a planned DAG (a direct one keeps no nodes)."""
    plan.kind = PLAN_KIND_SPLIT if split else PLAN_KIND_DIRECT
    plan.decision = SPLIT_DECISION if split else f"direct: {reason}"
    if not split:
        plan.ClearField("nodes")


def is_split(plan: Plan) -> bool:
    return plan.kind == PLAN_KIND_SPLIT


@dataclass(frozen=True)
class PlannerConfig:
    bypass_chars: int = 160
    bypass_max_tokens: int = 48
    max_nodes: int = 8
    epsilon_ms: float = 50.0
    # Models the orchestration never splits.
    excluded_models: frozenset[str] = frozenset()
    # Tokens a whole answer and one part of it are expected to take when max_tokens is unset.
    expected_tokens_per_part: int = 200
    aggregation_ms: float = 10.0


@dataclass
class ModelRates:
    """Rolling per-model rates from race events: first-token time and tokens per second."""

    first_token_ms: deque[float] = field(default_factory=lambda: deque(maxlen=200))
    tokens_per_s: deque[float] = field(default_factory=lambda: deque(maxlen=200))

    def ttft_ms(self) -> float:
        return statistics.median(self.first_token_ms) if self.first_token_ms else 500.0

    def tps(self) -> float:
        return statistics.median(self.tokens_per_s) if self.tokens_per_s else 30.0


def planner_config(settings: Settings) -> PlannerConfig:
    return PlannerConfig(
        bypass_chars=settings.planner_bypass_chars,
        bypass_max_tokens=settings.planner_bypass_max_tokens,
        max_nodes=settings.planner_max_nodes,
        epsilon_ms=settings.planner_epsilon_ms,
        excluded_models=frozenset(settings.orchestration_excluded_models),
    )


def fast_path(request: ChatRequest, config: PlannerConfig) -> Plan | None:
    """Stage 1 for a whole request: the plan it already has (the ingress decided: the client
    asked for no split, several choices, tools...), a bypass, or None (stage 2 must look).
    Pure and cheap, so privacy runs it as it hands the redacted request on, and a bypassed
    request skips the planner's process altogether."""
    if request.plan.kind != PLAN_KIND_UNSPECIFIED:
        return request.plan
    if request.model in config.excluded_models:
        return bypass_plan("model is never split")
    prompt = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
    reason = bypass_reason(prompt, request.params.max_tokens, config)
    return None if reason is None else bypass_plan(reason)


def bypass_reason(prompt: str, max_tokens: int, config: PlannerConfig) -> str | None:
    """Stage 1: why this request goes straight to the direct path, or None."""
    if len(prompt) < config.bypass_chars:
        return "short prompt"
    if max_tokens and max_tokens < config.bypass_max_tokens:
        return "small max_tokens"
    if len(_SENTENCE_END.findall(prompt.strip())) <= 1 and "\n" not in prompt.strip():
        return "single sentence"
    return None


_PLURAL_DEPENDENCY = re.compile(
    r"\b(results|outputs|answers|lists|the above|all of (?:the|that))\b", re.I
)


def _dependencies(index: int, text: str) -> list[str]:
    """A part that uses "the result" needs the one before; "the results", all before it."""
    if not index or not _DEPENDENCY.search(text):
        return []
    if _PLURAL_DEPENDENCY.search(text):
        return [f"n{i}" for i in range(index)]
    return [f"n{index - 1}"]


def _node(index: int, label: str, prompt: str, deps: list[str]) -> PlanNode:
    return PlanNode(node_id=f"n{index}", label=label, prompt=prompt, deps=deps, visible=True)


def decompose(prompt: str) -> Plan | None:
    """Stage 2 candidates from structure: an enumerated or bulleted list, or sentences joined
    by an explicit "then, using the result" dependency. None if the prompt has neither."""
    lines = prompt.strip().splitlines()
    items: list[tuple[str, str]] = []
    preamble: list[str] = []
    trailer: list[str] = []
    for line in lines:
        match = _ITEM.match(line)
        if match:
            items.append((match.group(1), match.group(2).strip()))
        elif items and line.strip() and not line.startswith((" ", "\t")):
            trailer.append(line.strip())
        elif items and line.strip():
            label, text = items[-1]
            items[-1] = (label, f"{text} {line.strip()}")
        elif not items:
            preamble.append(line)
    context = "\n".join(part for part in preamble if part.strip()).strip()
    if len(items) >= 2:
        nodes = []
        for index, (label, text) in enumerate(items):
            deps = _dependencies(index, text)
            parts = [context, f"{label} {text}", " ".join(trailer)]
            body = "\n\n".join(p for p in parts if p)
            nodes.append(_node(index, label, f"{body}\n\nAnswer only part {label}", deps))
        return Plan(nodes=nodes, source="structure")
    sentences = [s.strip() for s in _THEN.split(prompt.strip()) if s.strip()]
    if len(sentences) >= 2 and _DEPENDENCY.search(prompt):
        nodes = [_node(i, "", s, [f"n{i - 1}"] if i else []) for i, s in enumerate(sentences)]
        # A chain's parts build on each other: the client sees the last one only.
        for node in nodes[:-1]:
            node.visible = False
        return Plan(nodes=nodes, source="structure")
    return None


def validate(plan: Plan, max_nodes: int) -> str | None:
    """Why the plan cannot run (None if it can): size, prompts, references, cycles."""
    nodes = list(plan.nodes)
    if not nodes:
        return "empty plan"
    if len(nodes) > max_nodes:
        return f"{len(nodes)} nodes, more than {max_nodes}"
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids) or any(not i for i in ids):
        return "node ids must be unique and non-empty"
    if any(not n.prompt.strip() for n in nodes):
        return "every node needs a prompt"
    known = set(ids)
    if any(dep not in known for n in nodes for dep in n.deps):
        return "a node depends on a node that does not exist"
    if not any(n.visible for n in nodes):
        return "no node produces the answer"
    indegree = {n.node_id: len(set(n.deps)) for n in nodes}
    children: dict[str, list[str]] = {i: [] for i in ids}
    for n in nodes:
        for dep in set(n.deps):
            children[dep].append(n.node_id)
    ready = [i for i, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        current = ready.pop()
        seen += 1
        for child in children[current]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return None if seen == len(nodes) else "the plan has a cycle"


SPLIT_SCHEMA = {
    "type": "object",
    "required": ["nodes"],
    "properties": {
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "prompt"],
                "properties": {
                    "id": {"type": "string"},
                    "label": {"type": "string"},
                    "prompt": {"type": "string"},
                    "deps": {"type": "array", "items": {"type": "string"}},
                    "final": {"type": "boolean"},
                },
            },
        }
    },
}

SPLIT_INSTRUCTION = (
    "Split the user's request into independent sub-tasks that can be answered in parallel, "
    "with dependencies where a sub-task needs another's result. Reply with JSON only, "
    "matching this schema: " + json.dumps(SPLIT_SCHEMA) + ". If one sub-task combines the "
    'others into the final answer, mark it "final": true.'
)


def parse_split_reply(text: str) -> Plan:
    """A Plan from the split call's JSON reply; ValueError if it does not fit the schema."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in the split reply")
    try:
        raw = json.loads(text[start : end + 1])
    except json.JSONDecodeError as error:
        raise ValueError(f"split reply is not JSON: {error}") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("nodes"), list):
        raise ValueError('split reply has no "nodes" list')
    nodes = []
    finals = [bool(n.get("final")) for n in raw["nodes"] if isinstance(n, dict)]
    for entry in raw["nodes"]:
        if not isinstance(entry, dict):
            raise ValueError("a node is not an object")
        node_id, prompt = entry.get("id"), entry.get("prompt")
        deps = entry.get("deps", [])
        if not isinstance(node_id, str) or not isinstance(prompt, str):
            raise ValueError("every node needs a string id and prompt")
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise ValueError("deps must be a list of node ids")
        label = entry.get("label", "")
        visible = bool(entry.get("final")) if any(finals) else True
        nodes.append(
            PlanNode(
                node_id=node_id,
                label=label if isinstance(label, str) else "",
                prompt=prompt,
                deps=deps,
                visible=visible,
            )
        )
    return Plan(nodes=nodes, source="split_call")


def critical_path_parts(plan: Plan) -> int:
    """Nodes on the longest dependency path."""
    depth: dict[str, int] = {}
    by_id = {n.node_id: n for n in plan.nodes}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            depth[node_id] = 1 + max((visit(d) for d in by_id[node_id].deps), default=0)
        return depth[node_id]

    return max(visit(n.node_id) for n in plan.nodes)


def estimate_ms(
    plan: Plan,
    rates: ModelRates,
    max_tokens: int,
    config: PlannerConfig,
    split_call_ms: float,
    engines: int = 0,
) -> tuple[float, float]:
    """(L_dir, L_split): the whole answer from one host, or the parts in parallel, where
    L_split = t_split + t_agg + the longest dependency path of part latencies. With `engines`
    independent engines (0: unknown, as many as parts), at most that many parts run at once:
    the parts take at least ceil(parts / engines) rounds, however shallow the DAG."""
    parts = len(plan.nodes)
    per_part = config.expected_tokens_per_part
    total_tokens = max_tokens or per_part * parts
    part_tokens = min(per_part, max(1, total_tokens // parts))
    ttft, tps = rates.ttft_ms(), rates.tps()
    direct = ttft + total_tokens / tps * 1000
    part_ms = ttft + part_tokens / tps * 1000
    rounds = critical_path_parts(plan)
    if engines > 0:
        rounds = max(rounds, math.ceil(parts / engines))
    split = split_call_ms + config.aggregation_ms + rounds * part_ms
    return direct, split
