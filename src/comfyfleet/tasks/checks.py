"""What a submission is checked for before it is stored: text every store can keep, the workflow's format,
priority, graph, input files, webhook, pool.

Each check raises :class:`~comfyfleet.tasks.errors.Rejected` with a machine code and one problem per place
at fault; none of them touches the network or the store.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic_core import PydanticSerializationError, to_json
from standardwebhooks.webhooks import Webhook

from comfyfleet.comfy.errors import MalformedPrompt
from comfyfleet.comfy.workflow import INPUT_FILE_NODES, MODEL_INPUTS, validate
from comfyfleet.config import Limits, Settings
from comfyfleet.dispatch.inputs import InputError, check_input_spec
from comfyfleet.domain.graph import UI_FORMAT_HELP, GraphError, is_ui_format, validate_graph
from comfyfleet.tasks.commands import StoredInput, SubmitTask
from comfyfleet.tasks.errors import Problem, Rejected

MAX_WEBHOOK_URL_LENGTH = 2048
# NUL and the UTF-16 surrogate halves: JSON can spell them ("\u0000", a lone "\ud800"), Python keeps
# them, but PostgreSQL refuses both, and no UTF-8 answer can carry a lone surrogate.
_UNSTORABLE_CHARACTERS = re.compile("[\x00\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be kept (and answered) as it is by every store: ``"nul_character"``,
    ``"lone_surrogate"``, or None when it can."""
    if text.isascii():
        return "nul_character" if "\x00" in text else None
    found = _UNSTORABLE_CHARACTERS.search(text)
    if found is None:
        return None
    return "nul_character" if found.group() == "\x00" else "lone_surrogate"


def shown(text: str) -> str:
    """``text`` as it can be shown in an answer: unstorable characters escaped (``\\u0000``, ``\\ud800``)."""
    return _UNSTORABLE_CHARACTERS.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


TEXT_PROBLEMS = {
    "nul_character": "contains a NUL character (\\u0000), which cannot be stored",
    "lone_surrogate": "contains a lone UTF-16 surrogate (e.g. \\ud800 without its pair), which is not text",
    "non_finite_number": "is NaN or Infinity, which JSON does not allow",
}


def check_storable(command: SubmitTask) -> None:
    """Refuse a command holding a value no store keeps the same way (a NUL character or a lone surrogate in
    any string or key, at any depth; a NaN or Infinity number): PostgreSQL refuses them, SQLite would keep
    what no answer can carry. The first one found is reported, at its location."""
    fields: dict[str, Any] = {
        "payload": command.payload,
        "workflow_id": command.workflow_id,
        "pool": command.pool,
        "inputs": command.inputs,
        "webhook": command.webhook,
        "metadata": command.metadata,
        "models": command.models,
        "idempotency": command.idempotency.key if command.idempotency is not None else None,
    }
    if not _may_hold_unstorable(fields):
        return
    for name, value in fields.items():
        for location, kind in _unstorable_values(value, (name,)):
            where = ".".join(str(part) for part in location)
            message = f"{where} {TEXT_PROBLEMS[kind]}"
            raise Rejected("invalid_text", message, [Problem(location, TEXT_PROBLEMS[kind], kind)])


def _may_hold_unstorable(value: Any) -> bool:
    """A quick look (the whole command serialized once, in native code) that clears almost every command;
    True means "walk it to be sure"."""
    try:
        encoded = to_json(value, inf_nan_mode="constants")
    except PydanticSerializationError:  # a lone surrogate cannot be encoded as UTF-8
        return True
    # NUL, and the non-finite numbers Python's JSON reader accepts (NaN, Infinity, -Infinity); a hit (also
    # such words inside a string) is confirmed by a walk. Substring searches: quick over megabytes.
    return b"\\u0000" in encoded or b"NaN" in encoded or b"Infinity" in encoded


def _unstorable_values(
    value: Any, location: tuple[str | int, ...]
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """``(location, problem)`` of every unstorable key, string or number in ``value``, depth first.
    Iterative: a value nested thousands of levels deep cannot exhaust the stack."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, location)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            kind = text_problem(item)
            if kind is not None:
                yield where, kind
        elif isinstance(item, float):
            if not math.isfinite(item):
                yield where, "non_finite_number"
        elif isinstance(item, Mapping):
            children = []
            for key, child in item.items():
                kind = text_problem(key) if isinstance(key, str) else None
                if kind is not None:
                    yield (*where, shown(key)), kind
                children.append((child, (*where, shown(str(key)))))
            stack.extend(reversed(children))
        elif isinstance(item, list | tuple):
            stack.extend(reversed([(child, (*where, index)) for index, child in enumerate(item)]))


def check_api_format(payload: Any, *, location: tuple[str | int, ...] = ("payload",)) -> None:
    """A workflow saved in ComfyUI's UI format is not runnable: say how to export the API format.
    ``location``: where the workflow sits (a front door that found one in place of its whole request says so)."""
    if is_ui_format(payload):
        raise Rejected(
            "workflow_format_ui",
            'the workflow is in ComfyUI\'s UI format (top-level "nodes" and "links"), not the API format. '
            + UI_FORMAT_HELP,
            [Problem(location, "a UI-format workflow, not the API format", "workflow_format_ui")],
        )


def known_pools(settings: Settings) -> frozenset[str]:
    """Pool names and the labels pools carry: a task's ``pool`` may name either."""
    names = {pool.name for pool in settings.pools} | {
        label for pool in settings.pools for label in pool.labels
    }
    if settings.workers:
        names.add("default")  # the static workers given with --worker form the pool "default"
    return frozenset(names)


def check_priority(priority: int, limits: Limits) -> None:
    if not limits.min_priority <= priority <= limits.max_priority:
        raise Rejected(
            "priority_out_of_range",
            f"priority must be an integer from {limits.min_priority} to {limits.max_priority}, got {priority}",
            [Problem(("priority",), "out of range", "priority_out_of_range")],
        )


def check_structure(payload: Any, *, max_nodes: int) -> None:
    """The graph's shape: nodes, links, no cycle, at most ``max_nodes`` nodes."""
    problems = validate_graph(payload, max_nodes=max_nodes)
    if problems:
        raise invalid_graph(problems)


def check_size(payload: dict[str, Any], *, max_nodes: int) -> None:
    """The graph's size alone (what a check against the fleet's catalogue does not look at)."""
    if len(payload) > max_nodes:
        raise invalid_graph(validate_graph(payload, max_nodes=max_nodes))


def invalid_graph(problems: list[GraphError]) -> Rejected:
    first = problems[0].message
    more = len(problems) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return Rejected(
        "invalid_graph",
        f"the payload is not a valid workflow graph: {first}{suffix}",
        [
            Problem(
                ("payload", *(part for part in (problem.node_id, problem.input_name) if part is not None)),
                problem.message,
                problem.type,
                {"node_id": problem.node_id, "input_name": problem.input_name},
            )
            for problem in problems
        ],
    )


def check_against_catalogue(
    payload: dict[str, Any],
    object_info: Mapping[str, Any],
    *,
    attached: Collection[str],
    targets: list[Any] | None,
) -> dict[str, Any]:
    """Check ``payload`` as ComfyUI's ``POST /prompt`` does against the fleet's catalogue (coercing scalar
    inputs in place, as ComfyUI does); return the ``node_errors`` of outputs skipped while others passed.
    ``attached``: names of the task's input files, which no catalogue lists."""

    def accept(class_type: str, input_name: str, value: Any) -> bool:
        # Models may sit on another worker than the one whose catalogue lists them first, and the task's
        # input files travel with it: neither is in the catalogue's lists.
        if input_name in MODEL_INPUTS:
            return True
        return input_name in INPUT_FILE_NODES.get(class_type, ()) and value in attached

    try:
        result = validate(payload, object_info, partial_execution_targets=targets, accept_combo=accept)
    except MalformedPrompt as exc:
        error = {"type": "invalid_prompt", "message": str(exc), "details": "", "extra_info": {}}
        raise Rejected(
            "invalid_graph",
            str(exc),
            [Problem(("payload",), str(exc), "invalid_prompt")],
            comfyui_response={"error": error, "node_errors": {}},
        ) from exc
    if not result.ok:
        response = result.response()
        scrub_tracebacks(response)
        error = result.error or {}
        raise Rejected(
            "invalid_graph",
            str(error.get("message") or "the workflow failed validation"),
            _catalogue_problems(error, result.node_errors),
            comfyui_response=response,
        )
    return result.node_errors


def _catalogue_problems(error: Mapping[str, Any], node_errors: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for node_id, entry in node_errors.items():
        for problem in entry.get("errors", []) if isinstance(entry, dict) else []:
            extra = problem.get("extra_info") if isinstance(problem.get("extra_info"), dict) else {}
            input_name = extra.get("input_name")
            problems.append(
                Problem(
                    ("payload", node_id, *((input_name,) if isinstance(input_name, str) else ())),
                    str(problem.get("message", "invalid")),
                    str(problem.get("type", "invalid")),
                    {"node_id": node_id, "input_name": input_name if isinstance(input_name, str) else None},
                )
            )
    if not problems:
        problems.append(Problem(("payload",), str(error.get("message", "")), str(error.get("type", ""))))
    return problems


def scrub_tracebacks(body: dict[str, Any]) -> None:
    """Validation exceptions carry server tracebacks with paths; clients get the message only."""
    for node in (body.get("node_errors") or {}).values():
        for problem in node.get("errors", []) if isinstance(node, dict) else []:
            extra = problem.get("extra_info") if isinstance(problem, dict) else None
            if isinstance(extra, dict):
                extra.pop("traceback", None)


def check_inputs(inputs: list[dict[str, Any]] | None, *, max_bytes: int) -> None:
    for index, spec in enumerate(inputs or []):
        try:
            check_input_spec(spec, max_bytes=max_bytes)
        except InputError as exc:
            raise Rejected(
                "invalid_input", str(exc), [Problem(("inputs", index), str(exc), "invalid_input")]
            ) from None


def check_stored_inputs(inputs: list[dict[str, Any]] | None, stored: Collection[StoredInput]) -> None:
    """Stored input files (made by a front door) take names no other input of the task has."""
    taken = {spec.get("name") for spec in inputs or [] if isinstance(spec, dict)}
    for index, item in enumerate(stored):
        if item.name in taken:
            message = f"two input files are named {item.name!r}"
            raise Rejected("invalid_input", message, [Problem(("inputs", index), message, "invalid_input")])
        taken.add(item.name)


def webhook_problem(webhook: dict[str, Any]) -> str | None:
    """What is wrong with a task's ``webhook`` at submission, or None. (The address itself is checked
    before every attempt: DNS may change in between.)"""
    url = webhook.get("url")
    if (
        not isinstance(url, str)
        or urlsplit(url).scheme not in {"http", "https"}
        or not urlsplit(url).hostname
    ):
        return 'webhook needs "url": an http(s) URL'
    if len(url) > MAX_WEBHOOK_URL_LENGTH:
        return f"the webhook URL is longer than {MAX_WEBHOOK_URL_LENGTH} characters"
    unknown = sorted(set(webhook) - {"url", "secret"})
    if unknown:
        return f"unknown webhook field(s): {', '.join(unknown)}; a webhook has url and an optional secret"
    secret = webhook.get("secret")
    if secret is not None:
        try:
            Webhook(secret)
        except Exception:  # the library raises several types for a malformed key
            return "webhook secret must be 'whsec_' followed by base64"
    # Without a secret here or in the server's config, the task is still accepted: its delivery then fails
    # with a message saying so, visible on the task (the operator may add the secret meanwhile).
    return None


def check_webhook(webhook: dict[str, Any] | None) -> None:
    problem = webhook_problem(webhook) if webhook is not None else None
    if problem:
        raise Rejected("invalid_webhook", problem, [Problem(("webhook",), problem, "invalid_webhook")])


def check_pool(pool: str | None, known: Collection[str]) -> None:
    if pool is not None and known and pool not in known:
        raise Rejected(
            "unknown_pool",
            f"unknown pool {pool!r}; configured pools: {', '.join(sorted(known))}",
            [Problem(("pool",), "unknown pool", "unknown_pool")],
        )
