"""End-user ids never reach a store, a log or OpenAI in the clear."""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache


@lru_cache(maxsize=65_536)
def hash_user_id(user_id: str, salt: str) -> str:
    """A stable, salted pseudonym: the same user maps to the same value for one salt."""
    digest = hmac.new(salt.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    return f"user_{digest[:24]}"
