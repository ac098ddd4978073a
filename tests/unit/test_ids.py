from __future__ import annotations

import pytest

from lovd import ids
from lovd.errors import LovdError

BAD = [
    "../x",
    "%2e%2e%2f",
    "a" * 300,
    "abc\r\ndef",
    "abcd\x00efabcdefab",
    "ABCDEF0123456789",
    "",
    "0123456789abcdef/",
    "0123456789abcde",
]


@pytest.mark.parametrize("bad", BAD)
def test_bad_ids_never_become_names(bad: str) -> None:
    assert not ids.is_valid(bad)
    for fn in (ids.check, ids.unit_name, ids.container_name, ids.secret_file_name):
        with pytest.raises(LovdError) as e:
            fn(bad)
        assert e.value.status == 400


def test_generated_ids_and_tokens() -> None:
    sid = ids.new_session_id()
    assert ids.is_valid(sid)
    assert ids.unit_name(sid) == f"lovd-session-{sid}.service"
    token = ids.new_token()
    assert len(token) >= 43
    h = ids.hash_token(token)
    assert token not in h and ids.token_matches(token, h) and not ids.token_matches("x", h)


def test_password_is_derived_per_session() -> None:
    a, b = ids.new_session_id(), ids.new_session_id()
    key = b"k" * 32
    assert ids.derive_password(key, a) == ids.derive_password(key, a)
    assert ids.derive_password(key, a) != ids.derive_password(key, b)
    assert ids.derive_password(key, a) != ids.derive_password(b"j" * 32, a)
