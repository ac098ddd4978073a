"""Root-owned canaries for the tests that try symlink attacks on root-run packaging.

A canary is a root-owned directory in the machine holding what an attacker would aim
at: a secret file (0600, like /etc/shadow), a public one (0644, like /etc/passwd) and a
directory (0755, like /etc). The lovd user may traverse it but write nothing there, as
with the real targets, so only root following a planted link can change it. A snapshot
records everything such a mistake would change: names, owners, modes, types, sizes,
link targets, modification times and contents.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.e2e.machine import Machine

SECRET = "root:$y$j9T$canary:19000:0:99999:7:::\n"
PUBLIC = "root:x:0:0:root:/root:/bin/bash\n"

_MAKE = r"""
set -e
d=$(mktemp -d /var/tmp/lovd-canary.XXXXXX)
chmod 0755 "$d"
printf '%s' "$1" > "$d/shadow" && chmod 0600 "$d/shadow"
printf '%s' "$2" > "$d/passwd" && chmod 0644 "$d/passwd"
mkdir -m 0755 "$d/etc" && printf 'keep\n' > "$d/etc/inside" && chmod 0644 "$d/etc/inside"
echo "$d"
"""

_SNAPSHOT = r"""
cd "$1"
find . -printf '%p %u:%g %m %y %s %l %T@\n' | sort
find . -type f -exec sha256sum {} + | sort
"""


@dataclass(frozen=True)
class Canary:
    root: str

    @property
    def secret(self) -> str:
        return f"{self.root}/shadow"

    @property
    def public(self) -> str:
        return f"{self.root}/passwd"

    @property
    def dir(self) -> str:
        return f"{self.root}/etc"


PREFIX = "/var/tmp/lovd-canary."


def make(m: Machine) -> Canary:
    c = Canary(m.out("bash", "-c", _MAKE, "-", SECRET, PUBLIC))
    _check(c)
    return c


def snapshot(m: Machine, c: Canary) -> str:
    out = m.out("bash", "-c", _SNAPSHOT, "-", c.root)
    # A canary that is not all there would make "unchanged" mean nothing.
    assert "./shadow root:root 600 f" in out and "./etc/inside root:root 644 f" in out, out
    return out


def _check(c: Canary) -> None:
    # remove() deletes this tree as root: only ever a directory mktemp made for a canary.
    name = c.root.removeprefix(PREFIX)
    assert c.root.startswith(PREFIX) and len(name) == 6 and name.isalnum(), c.root


def remove(m: Machine, c: Canary) -> None:
    _check(c)
    m.run("rm", "-rf", "--one-file-system", "--", c.root, check=False)
