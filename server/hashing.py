"""The keyed hash that stands for a user id wherever the gateway must not hold it in clear.

Log lines carry its first 16 hex digits (`user_hash`); the history store keys a user's events by
32 digits (`user_key`: 128 bits, so that two users never share a history in practice). Both are
HMAC-SHA256 under one key (`LTREC_USER_HASH_KEY`), so a log line's user is the prefix of that
user's store key, and neither can be reversed without the key.
"""

from __future__ import annotations

import hashlib
import hmac

LOG_DIGITS = 16
KEY_DIGITS = 32


def user_hash(user_id: str, key: bytes, digits: int = LOG_DIGITS) -> str:
    """Keyed hash of a user id for logs: joinable across lines, not reversible without the key."""
    if not user_id:
        return ""
    mac = hmac.new(key, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return mac.hexdigest()[:digits]


def user_key(user_id: str, key: bytes) -> str:
    """The history store's key of a (non-empty) user id."""
    return user_hash(user_id, key, KEY_DIGITS)
