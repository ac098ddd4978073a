"""One line of ``lovd doctor``'s report: a check's name, status, detail and fix.

A ground-floor module (nothing of lovd's imported) so checks that live with their subject
(``sync/doctor.py``, …) and ``doctor.py``, which gathers them, import it without
importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)
