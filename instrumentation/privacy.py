"""End-user ids never reach a store or a log in the clear."""

from __future__ import annotations

import hashlib
import hmac


def hash_user_id(user_id: str, salt: str) -> str:
    """A stable, salted pseudonym: the same user maps to the same value for one salt."""
    digest = hmac.new(salt.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    return f"user_{digest[:24]}"
