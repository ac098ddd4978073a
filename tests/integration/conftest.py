from __future__ import annotations

import pytest

from tests.conftest import need
from tests.integration.caddy_harness import caddy_binary


@pytest.fixture(scope="session")
def caddy_bin() -> str:
    path = caddy_binary()
    need(path is not None, "caddy is not installed (apt-get install caddy)")
    assert path is not None
    return path
