"""What the vendor activities (PagerDuty and Jira, both on `requests`) share about failures."""

from __future__ import annotations

import hashlib

from requests.exceptions import InvalidJSONError
from requests.exceptions import JSONDecodeError as ResponseNotJSON
from temporalio import activity

# Answers no retry can change: the request itself is refused (credentials, project, a body
# the vendor cannot parse or will not take).
PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 413, 422})


def request_unencodable(exc: BaseException) -> bool:
    """Our request body could not be encoded (the same on every try); an answer that is not
    JSON subclasses the same exception and is the vendor's, retryable."""
    return isinstance(exc, InvalidJSONError) and not isinstance(exc, ResponseNotJSON)


def attempt_key(info: activity.Info) -> str:
    """The same for every attempt of one activity execution (its workflow run and activity id),
    different for any other execution: what a retry looks for to learn whether an earlier
    attempt already told the vendor."""
    run = info.workflow_run_id or info.workflow_id or ""
    return hashlib.sha256(f"{run}/{info.activity_id}".encode()).hexdigest()[:32]
