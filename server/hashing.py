"""The keyed hash that stands for a user id wherever the gateway must not hold it in clear, and
the sealed id the history store keeps so that Audience can answer with the caller's ids.

Log lines carry its first 16 hex digits (`user_hash`); the history store keys a user's events by
32 digits (`user_key`: 128 bits, so that two users never share a history in practice). Both are
HMAC-SHA256 under one key (`LTREC_USER_HASH_KEY`), so a log line's user is the prefix of that
user's store key, and neither can be reversed without the key.

Audience must return user ids, which a hash cannot give back. So the store also keeps each user's
id *sealed* (`seal_user_id`): encrypted under a key derived from the same HMAC key, never in
clear. The scheme is deterministic authenticated encryption in the SIV style, from HMAC-SHA256
alone (the gateway's image has no cipher library): the synthetic IV is the user's store key
itself (an HMAC of the id), the keystream is HMAC-SHA256(sealing key, IV || counter), and opening
recomputes the store key from the recovered id and refuses a mismatch, which authenticates the
id and binds it to its row. Equal ids give equal sealed ids, which reveals nothing the store key
does not already. Whoever holds the key can open the ids, as the gateway must; a copy of the
store without the key (a backup, a Redis dump) holds no id in clear.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

LOG_DIGITS = 16
KEY_DIGITS = 32
SEALED_PREFIX = "s1:"  # the scheme's version
_SEALING_LABEL = b"ltrec user id sealing v1"
_BLOCK = hashlib.sha256().digest_size


def user_hash(user_id: str, key: bytes, digits: int = LOG_DIGITS) -> str:
    """Keyed hash of a user id for logs: joinable across lines, not reversible without the key."""
    if not user_id:
        return ""
    return hmac.digest(key, user_id.encode("utf-8", "surrogatepass"), "sha256").hex()[:digits]


def user_key(user_id: str, key: bytes) -> str:
    """The history store's key of a (non-empty) user id."""
    return user_hash(user_id, key, KEY_DIGITS)


def _keystream(store_key: str, key: bytes, length: int) -> bytes:
    sealing_key = hmac.new(key, _SEALING_LABEL, hashlib.sha256).digest()
    iv = store_key.encode("ascii")
    blocks = (
        hmac.new(sealing_key, iv + counter.to_bytes(4, "big"), hashlib.sha256).digest()
        for counter in range(-(-length // _BLOCK))
    )
    return b"".join(blocks)[:length]


def seal_user_id(user_id: str, key: bytes) -> str:
    """The id encrypted under `key` (see the module docstring), for the history store."""
    plain = user_id.encode("utf-8", "surrogatepass")
    stream = _keystream(user_key(user_id, key), key, len(plain))
    sealed = bytes(a ^ b for a, b in zip(plain, stream, strict=True))
    return SEALED_PREFIX + base64.b64encode(sealed).decode("ascii")


def open_user_id(sealed: str, store_key: str, key: bytes) -> str | None:
    """The id sealed in `sealed` for the row keyed `store_key`; None when it cannot be opened
    (another key, another row's id, not a sealed id)."""
    if not sealed.startswith(SEALED_PREFIX):
        return None
    try:
        data = base64.b64decode(sealed[len(SEALED_PREFIX) :], validate=True)
        stream = _keystream(store_key, key, len(data))
        user_id = bytes(a ^ b for a, b in zip(data, stream, strict=True)).decode(
            "utf-8", "surrogatepass"
        )
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    if not user_id or not hmac.compare_digest(user_key(user_id, key), store_key):
        return None
    return user_id
