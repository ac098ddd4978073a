"""The last line of ``lovd doctor``: an operator reads it first."""

from __future__ import annotations

from lovd.doctor import Check, render


def test_summary_counts_warnings() -> None:
    out = render([Check("a", "ok", "fine"), Check("b", "warn", "hmm"), Check("c", "warn", "hmm")])
    assert out.splitlines()[-1] == "all checks passed with 2 warnings"
    one = render([Check("a", "ok", "fine"), Check("b", "warn", "hmm")])
    assert one.splitlines()[-1] == "all checks passed with 1 warning"


def test_summary_without_warnings_or_with_failures() -> None:
    assert render([Check("a", "ok", "fine")]).splitlines()[-1] == "all checks passed"
    out = render([Check("a", "fail", "broken", "fix it"), Check("b", "warn", "hmm")])
    assert out.splitlines()[-1] == "1 problem(s) found"
