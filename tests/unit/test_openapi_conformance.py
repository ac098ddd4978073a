"""The API and its OpenAPI description agree: Schemathesis over the served description.

Schemathesis (``st run``, every check: no 5xx, documented status codes, content types,
response headers and schemas, schema-violating requests refused, schema-valid ones
accepted, 405 with ``Allow`` for undeclared methods, …) generates ≥ 5,000 requests from
``GET /api/openapi.json`` against the in-process app with the fake runner, in two runs:
the stateful phase first (the description's links let it create, read, enter and delete
real sessions while places are free), then examples, coverage and fuzzing. About a
minute of CPU.
Any failure fails the test with Schemathesis's own report, which names a ``curl`` that
reproduces it.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from tests.conftest import need
from tests.unit.conftest import open_api

MIN_CASES = 5000
# Fixed, so a failure reproduces; LOVD_SCHEMATHESIS_SEED explores elsewhere.
SEED = os.environ.get("LOVD_SCHEMATHESIS_SEED", "20261202")


async def test_schemathesis_finds_no_failure(tmp_path: Path, free_ports: list[int]) -> None:
    st = Path(sys.executable).with_name("st")
    need(st.exists(), "schemathesis is not installed (it is in pyproject's dev extras)")
    settings = {
        "limits": {"max_running": 40},
        # Sessions expire soon and POST /api/cleanup (which the fuzzer calls) frees their
        # places, so creates keep reaching the runner instead of only 429.
        "session_ttl": 5,
        # The link checks' failure limit would turn most /c/{id} cases into 429.
        "browser": {"auth_failures": 1_000_000, "auth_failure_window": 1},
    }
    # A session link works once (session/links.py): following the create's link a second
    # time is a schema-valid request that must be refused, 410 link-used. Every other
    # expectation of the check stays Schemathesis' own.
    config_file = tmp_path / "schemathesis.toml"
    config_file.write_text(
        "[checks.positive_data_acceptance]\n"
        'expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "410", "429", "5xx"]\n'
    )
    reports: list[str] = []
    async with open_api(tmp_path, free_ports, **settings) as api:
        url = str(api.client.make_url("/api/openapi.json"))
        # The stateful phase first, while every place is free: it follows the links from
        # POST /api/sessions (a 429 has none to follow).
        for phases, examples in (("stateful", "400"), ("examples,coverage,fuzzing", "450")):
            proc = await asyncio.create_subprocess_exec(
                str(st), "--config-file", str(config_file), "run", url,
                "--checks", "all", "--phases", phases,
                "--max-examples", examples, "--workers", "1", "--seed", SEED, "--no-color",
                "--generation-database", "none", "--request-timeout", "30",
                cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=900)
            reports.append(out.decode(errors="replace"))
            assert proc.returncode == 0, reports[-1][-12000:]
    artifacts = os.environ.get("LOVD_ARTIFACTS")
    if artifacts:
        Path(artifacts, "schemathesis.txt").write_text("\n".join(reports))
    cases = 0
    for report in reports:
        summary = re.search(r"Test cases:\s*\n\s*(\d+) generated, (.*)", report)
        assert summary is not None, report[-4000:]
        assert summary.group(2) == f"{summary.group(1)} passed", summary.group(0)
        cases += int(summary.group(1))
    links = re.search(r"API Links: +(\d+) covered / (\d+) selected", reports[0])
    assert links is not None and int(links.group(1)) > 0, reports[0][-4000:]
    print(
        f"schemathesis: {cases} cases, 0 failures, {links.group(1)}/{links.group(2)} "
        f"links followed (seed {SEED})"
    )
    assert cases >= MIN_CASES, f"only {cases} cases"
