"""Session ids and tokens. Ids are validated here before they touch a path, unit or route."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from lovd.errors import LovdError

# Generated ids are 16 lowercase hex characters; the pattern is anchored and
# matched with fullmatch so no '/', '..', newline or NUL can ever pass.
_ID_RE = re.compile(r"[0-9a-f]{16}")


def new_session_id() -> str:
    return secrets.token_hex(8)


def is_valid(session_id: str) -> bool:
    return _ID_RE.fullmatch(session_id) is not None


def check(session_id: str) -> str:
    if not is_valid(session_id):
        shown = session_id[:40].encode("unicode_escape").decode("ascii")
        raise LovdError(
            "invalid-session-id",
            f"'{shown}' is not a session id (expected 16 lowercase hex characters)",
        )
    return session_id


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), token_hash)


def unit_name(session_id: str) -> str:
    return f"lovd-session-{check(session_id)}.service"


def container_name(session_id: str) -> str:
    return f"lovd-{check(session_id)}"


def secret_file_name(session_id: str) -> str:
    return f"{check(session_id)}.env"


def derive_password(host_key: bytes, session_id: str) -> str:
    """The container's own server password: derived, so it is never stored anywhere."""
    return hmac.new(host_key, f"opencode:{check(session_id)}".encode(), "sha256").hexdigest()
