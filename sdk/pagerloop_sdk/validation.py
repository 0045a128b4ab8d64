"""`validate` controls: check the output of a call, and send it once more when the check fails.

The control's value names the check:
- `json`: the output text parses as JSON;
- `schema:<name>`: it parses, and the value matches the JSON schema the app registered with
  `register_schema(name, schema)`;
- any other name: a check the app registered with `register_validator(name, fn)`, where
  `fn(output_text)` returns True (passes), or False or a reason (a str) when it fails.

The checks live in the app's process (a schema or a function is the app's knowledge, not the
server's): a control naming a check this process does not know is skipped, with a warning once,
and a check that raises is taken as passed (warned once too). A validate control never breaks a
call.

On a failure the request is sent once more, as it was (paced like a retried request under rpm
controls, in the same concurrency slot), and its answer is checked too: the caller gets the
first answer that passes, else the second one (or the first, when the second attempt raised).
The record names `validate#<id>` whenever it retried; when the answer returned still fails, its
metadata says `validation: failed` and a quality score of 0 (source "scorer", label
"validation_failed") goes with it to the quality store, so a quality detector sees it. An
answer that failed its check is never kept in the response cache.

Streams pass through unchecked: the caller reads a stream as it arrives, so by the time the
output is whole the caller has already used it, and a second attempt cannot be taken back
(buffering the whole stream to check it first would remove the only reason to stream).
Embeddings have no output text: the control does not match them (`pagerloop_sdk.controls`).

JSON schemas are checked with `jsonschema_rs` (full JSON Schema) when the app has it installed;
without it, with a built-in subset (`type`, `enum`, `const`, `required`, `properties`,
`additionalProperties`, `items`, `minItems`/`maxItems`, `minLength`/`maxLength`,
`minimum`/`maximum`, `allOf`/`anyOf`/`oneOf`/`not`), and `register_schema` refuses a schema that
needs more than the subset rather than checking it partly.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from pagerloop_sdk import limiter
from pagerloop_sdk.controls import CHECK_NAME, Decision, Rule, _warn_once
from pagerloop_sdk.openai_hooks import parsed
from pagerloop_sdk.records import ERROR_MESSAGE_MAX, CallRecord, ScoreRecord

if TYPE_CHECKING:
    from pagerloop_sdk.capture import PendingCall

log = logging.getLogger(__name__)

JSON_CHECK = "json"
SCHEMA_PREFIX = "schema:"
FAILED_LABEL = "validation_failed"
METADATA_KEY = "validation"
EVALUATOR = "pagerloop-validate"

Validator = Callable[[str], bool | str]
Check = Callable[[str], str | None]  # the reason it fails, None when it passes


class Plan(Protocol):
    """The controls acting on one call, as `pagerloop_sdk.enforce.Plan` has them (which
    imports this module)."""

    decision: Decision
    tags: list[str]
    retries: int
    cache_key: str | None


_lock = threading.Lock()
_schemas: dict[str, Check] = {}
_validators: dict[str, Validator] = {}


# --- what the app registers ------------------------------------------------------------------


def register_schema(name: str, schema: Mapping[str, Any]) -> None:
    """Make `schema:<name>` a check in this process: the output parses as JSON and matches
    `schema` (a JSON schema, as a dict). Registering a name again replaces its schema.
    ValueError when the schema is not one."""
    if not CHECK_NAME.fullmatch(SCHEMA_PREFIX + name) or not name:
        raise ValueError(f"a schema name is letters, digits and `_.:-`, not {name!r}")
    check = _schema_check(dict(schema))
    with _lock:
        _schemas[name] = check


def register_validator(name: str, fn: Validator) -> None:
    """Make `name` a check in this process: `fn(output_text)` returns True when the output
    passes, False or the reason (a str) when it fails. Registering a name again replaces it."""
    if not CHECK_NAME.fullmatch(name) or name == JSON_CHECK or name.startswith(SCHEMA_PREFIX):
        raise ValueError(
            f"a check name is letters, digits and `_.:-`, and neither `json` nor `schema:...`: "
            f"{name!r}"
        )
    if not callable(fn):
        raise TypeError("a validator is a function of the output text")
    with _lock:
        _validators[name] = fn


def unregister(name: str) -> None:
    """Forget a check (`schema:<name>` or a validator's name): its controls are skipped."""
    with _lock:
        if name.startswith(SCHEMA_PREFIX):
            _schemas.pop(name.removeprefix(SCHEMA_PREFIX), None)
        else:
            _validators.pop(name, None)


# --- the checks ---------------------------------------------------------------------------------


def check_json(output: str) -> str | None:
    try:
        json.loads(output)
    except ValueError as exc:
        return f"not JSON ({exc})"
    return None


def _with_validator(name: str, fn: Validator) -> Check:
    def check(output: str) -> str | None:
        verdict = fn(output)
        if isinstance(verdict, str):
            return verdict or f"check {name} failed"
        return None if verdict else f"check {name} failed"

    return check


def check_for(value: str) -> Check | None:
    """The check a validate control names, or None when this process does not know it."""
    if value == JSON_CHECK:
        return check_json
    with _lock:
        if value.startswith(SCHEMA_PREFIX):
            return _schemas.get(value.removeprefix(SCHEMA_PREFIX))
        fn = _validators.get(value)
    return None if fn is None else _with_validator(value, fn)


def _schema_check(schema: dict[str, Any]) -> Check:
    try:
        import jsonschema_rs
    except ImportError:
        problem = subset_problem(schema)
        if problem is not None:
            raise ValueError(
                f"{problem}: install jsonschema-rs for full JSON Schema, or simplify it"
            ) from None

        def check(output: str) -> str | None:
            try:
                value = json.loads(output)
            except ValueError as exc:
                return f"not JSON ({exc})"
            return subset_error(schema, value)

        return check

    try:
        validator = jsonschema_rs.validator_for(schema)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a JSON schema: {exc}") from None

    def check_rs(output: str) -> str | None:
        try:
            value = json.loads(output)
        except ValueError as exc:
            return f"not JSON ({exc})"
        for error in validator.iter_errors(value):
            where = "/".join(str(part) for part in error.instance_path)
            return f"at /{where}: {error.message}"
        return None

    return check_rs


# The built-in subset of JSON Schema: what it checks, and the keywords it may ignore (they
# describe, they do not constrain).
SUBSET = frozenset(
    {
        "type",
        "enum",
        "const",
        "required",
        "properties",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
    }
)
ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "default", "examples", "deprecated"}
)
TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
}


def subset_problem(schema: Any, where: str = "") -> str | None:
    """Why the built-in subset cannot check `schema` faithfully, or None when it can."""
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"the schema at /{where} is not an object"
    for keyword, value in schema.items():
        if keyword in ANNOTATIONS:
            continue
        if keyword not in SUBSET:
            return f"the schema at /{where} uses {keyword!r}"
        if keyword == "type":
            names = value if isinstance(value, list) else [value]
            if not names or any(name not in TYPES for name in names):
                return f"the schema at /{where} has an unknown type {value!r}"
        inner: list[tuple[str, Any]] = []
        if keyword == "properties" and isinstance(value, dict):
            inner = [(f"{where}/properties/{k}", v) for k, v in value.items()]
        elif keyword in ("additionalProperties", "items", "not"):
            inner = [(f"{where}/{keyword}", value)]
        elif keyword in ("allOf", "anyOf", "oneOf"):
            if not isinstance(value, list) or not value:
                return f"the schema at /{where} needs a list in {keyword!r}"
            inner = [(f"{where}/{keyword}/{i}", v) for i, v in enumerate(value)]
        for path, sub in inner:
            problem = subset_problem(sub, path.lstrip("/"))
            if problem is not None:
                return problem
    return None


def subset_error(schema: Any, value: Any, where: str = "") -> str | None:
    """The first way `value` fails `schema` (checked by `subset_problem`), or None."""
    at = f"at /{where}"
    if schema is True:
        return None
    if schema is False:
        return f"{at}: nothing is allowed here"
    kind = schema.get("type")
    if kind is not None:
        names = kind if isinstance(kind, list) else [kind]
        if not any(TYPES[name](value) for name in names):
            return f"{at}: {json.dumps(value)[:80]} is not of type {' or '.join(names)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{at}: {json.dumps(value)[:80]} is not one of {schema['enum']!r}"
    if "const" in schema and value != schema["const"]:
        return f"{at}: {json.dumps(value)[:80]} is not {schema['const']!r}"
    errors: list[str | None] = []
    if isinstance(value, dict):
        errors += [
            f"{at}: {name!r} is missing" for name in schema.get("required", ()) if name not in value
        ]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            sub = properties.get(key, extra)
            errors.append(subset_error(sub, item, f"{where}/{key}".lstrip("/")))
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{at}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{at}: more than {schema['maxItems']} items")
        if "items" in schema:
            errors += [
                subset_error(schema["items"], item, f"{where}/{i}".lstrip("/"))
                for i, item in enumerate(value)
            ]
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{at}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{at}: longer than {schema['maxLength']}")
    if TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{at}: less than {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{at}: more than {schema['maximum']}")
    for sub in schema.get("allOf", ()):
        errors.append(subset_error(sub, value, where))
    if "anyOf" in schema and all(subset_error(s, value, where) for s in schema["anyOf"]):
        errors.append(f"{at}: matches none of anyOf")
    if "oneOf" in schema:
        passing = sum(subset_error(s, value, where) is None for s in schema["oneOf"])
        if passing != 1:
            errors.append(f"{at}: matches {passing} of oneOf, not exactly 1")
    if "not" in schema and subset_error(schema["not"], value, where) is None:
        errors.append(f"{at}: matches what `not` excludes")
    return next((error for error in errors if error), None)


# --- one call under a validate control ----------------------------------------------------------


def output_text(operation: str, payload: Any) -> str | None:
    """The text of a response to check; None when it has none to check (an answer that is
    only tool calls)."""
    if operation == "chat":
        choices = getattr(payload, "choices", None) or ()
        if not choices:
            return ""
        message = choices[0].message
        content = getattr(message, "content", None)
        if content is None and getattr(message, "tool_calls", None):
            return None
        return content or ""
    if operation == "responses":
        text = str(getattr(payload, "output_text", "") or "")
        kinds = {getattr(item, "type", "") for item in getattr(payload, "output", None) or ()}
        if not text and "function_call" in kinds:
            return None
        return text
    return None


def _verdict(rule: Rule, check: Check, operation: str, result: Any) -> str | None:
    """Why the result fails its check, or None when it passes (or cannot be checked)."""
    try:
        text = output_text(operation, parsed(result))
        return None if text is None else check(text)
    except Exception as exc:  # the app's check is broken: never break the call for it
        _warn_once(
            f"check-raised:{rule.id}:{rule.value}",
            "validate control #%s: check %r raised %s; taken as passed",
            rule.id,
            rule.value,
            f"{type(exc).__name__}: {exc}",
        )
        return None


def _check(call: PendingCall, plan: Plan) -> tuple[Rule, Check] | None:
    rule = plan.decision.validate
    if rule is None or call.stream:
        return None
    check = check_for(rule.value)
    if check is None:
        _warn_once(
            f"unknown-check:{rule.id}:{rule.value}",
            "ignoring validate control #%s: no check %r in this process (register_schema or "
            "register_validator)",
            rule.id,
            rule.value,
        )
        return None
    return rule, check


def _retrying(call: PendingCall, plan: Plan, rule: Rule) -> list[tuple[limiter.Pacer, float]]:
    """Count the second attempt as a retry (the SDK's retries of the first one too), and what
    it takes off the requests-per-minute schedules."""
    if rule.tag not in plan.tags:
        plan.tags.append(rule.tag)
    plan.retries += call.retry_count + 1
    return [(pacer, 1.0) for r, pacer in plan.decision.paces if r.kind == "rpm"]


def _attempt_noted(call: PendingCall) -> tuple[int | None, str | None, int]:
    return call.http_status, call.request_id, call.retry_count


def _restore(call: PendingCall, noted: tuple[int | None, str | None, int]) -> None:
    """The record describes the answer returned: the first, when the second attempt raised."""
    call.http_status, call.request_id, call.retry_count = noted


def _failed(call: PendingCall, plan: Plan, rule: Rule, why: str) -> None:
    call.invalid = f"{rule.value}: {why}"[:ERROR_MESSAGE_MAX]
    # A sampled call's score is then 0 (the recorder sends the failure in place of the heuristic
    # score); an unsampled one stays unscored, so the quality mean keeps sampling every answer
    # at the same rate, failed or not.
    metadata = {**call.context.metadata, METADATA_KEY: f"failed: {rule.value}"}
    call.context = replace(call.context, metadata=metadata)
    plan.cache_key = None


# A check an answer failed: the control's rule, its check, and why.
Failed = tuple[Rule, Check, str]


def _first_failed(result: Any, call: PendingCall, plan: Plan) -> Failed | None:
    """The call's check, and why its answer failed it; None when there is none or it passed."""
    found = _check(call, plan)
    if found is None:
        return None
    rule, check = found
    why = _verdict(rule, check, call.operation, result)
    return None if why is None else (rule, check, why)


def _second_judged(call: PendingCall, plan: Plan, failed: Failed, again: Any) -> Any:
    """The second attempt's answer, noted as failed when it fails the check too."""
    rule, check, _ = failed
    why = _verdict(rule, check, call.operation, again)
    if why is not None:
        _failed(call, plan, rule, why)
    return again


def _second_raised(
    call: PendingCall,
    plan: Plan,
    failed: Failed,
    noted: tuple[int | None, str | None, int],
    exc: Exception,
) -> None:
    """The second attempt raised: the first answer stands, noted as failed."""
    rule, _, why = failed
    _restore(call, noted)
    _failed(call, plan, rule, f"{why}; the second attempt raised {type(exc).__name__}")


def checked_sync(result: Any, call: PendingCall, plan: Plan, send: Callable[[], Any]) -> Any:
    """The answer to return: `result` when it passes its check, else a second attempt's."""
    failed = _first_failed(result, call, plan)
    if failed is None:
        return result
    limiter.pace(_retrying(call, plan, failed[0]))
    noted = _attempt_noted(call)
    try:
        again = send()
    except Exception as exc:
        _second_raised(call, plan, failed, noted, exc)
        return result
    return _second_judged(call, plan, failed, again)


async def checked_async(
    result: Any, call: PendingCall, plan: Plan, send: Callable[[], Awaitable[Any]]
) -> Any:
    failed = _first_failed(result, call, plan)
    if failed is None:
        return result
    await limiter.pace_async(_retrying(call, plan, failed[0]))
    noted = _attempt_noted(call)
    try:
        again = await send()
    except Exception as exc:
        _second_raised(call, plan, failed, noted, exc)
        return result
    return _second_judged(call, plan, failed, again)


def failure_score(call: PendingCall, record: CallRecord) -> ScoreRecord:
    """The quality score of an answer that failed its validate control (recorder's thread)."""
    return ScoreRecord(
        call_id=record.call_id,
        ts=record.ts,
        source="scorer",
        score=0.0,
        format_compliance=0.0,
        evaluator=EVALUATOR,
        label=FAILED_LABEL,
        comment=call.invalid,
        model=record.response_model or record.model,
        feature=record.feature,
    )
