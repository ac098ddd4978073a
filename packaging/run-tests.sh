#!/usr/bin/env bash
# The test command (README, CI): prepares the host if needed, then runs
#   1. ruff (lint and format) and mypy --strict,
#   2. the suite as the unprivileged lovd user (real rootless Podman, Caddy,
#      PostgreSQL, OpenCode, Chromium),
#   3. the systemd end-to-end suite as root (it boots a systemd machine with
#      systemd-nspawn and installs lovd into it with packaging/install.sh).
# With CI=true, any test that cannot run here fails instead of skipping.
#
#   packaging/run-tests.sh [pytest args for step 2]   (as root, or a user who may sudo)
set -euo pipefail

# It sets up users and packages and runs parts of the suite as root. The README's
# command works as written in a root shell (a fresh VM often has no sudo at all) and
# from an account with sudo: then it asks sudo to run it again, keeping CI and the
# LOVD_* settings.
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    keep=$(compgen -e | grep -E '^(LOVD_[A-Z0-9_]*|CI)$' | paste -sd, -) || true
    exec sudo ${keep:+--preserve-env="$keep"} -- "$0" "$@"
  fi
  echo "run-tests.sh sets up users and packages and runs parts of the suite as root:" \
    "run it as root (su -c '$0'), or install sudo" >&2
  exit 2
fi

here=$(cd "$(dirname "$0")/.." && pwd)
# lovd runs from this checkout as the unprivileged lovd user (the venv is an editable
# install of it): a clone in root's home (/root is 0700) fails much later with
# "Permission denied". Say so before installing anything.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/packaging/lib.sh"
reachable_by_others "$here" run-tests.sh
cd "$here"
VENV=${LOVD_VENV:-/opt/lovd/venv}
LOVD_USER=${LOVD_USER:-lovd}

if [ -z "${LOVD_SKIP_SETUP:-}" ]; then
  bash packaging/setup-host.sh
fi

# The browser tests drive Debian's chromium with playwright-core (never a browser download).
sh tests/browser/setup.sh

export PYTHONDONTWRITEBYTECODE=1
echo "==> ruff"
"$VENV/bin/ruff" check --no-cache lovd tests
"$VENV/bin/ruff" format --check --no-cache lovd tests
echo "==> mypy --strict lovd/"
"$VENV/bin/mypy" --cache-dir=/tmp/lovd-mypy-cache lovd

uid=$(id -u "$LOVD_USER")
artifacts="$here/test-artifacts"
install -d -o "$LOVD_USER" -m 0755 "$artifacts"
echo "==> pytest as $LOVD_USER (unit, integration, browser)"
status=0
runuser -u "$LOVD_USER" -- env -C "$here" \
  HOME="$(getent passwd "$LOVD_USER" | cut -d: -f6)" XDG_RUNTIME_DIR="/run/user/$uid" \
  PATH="$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" CI="${CI:-}" PYTHONDONTWRITEBYTECODE=1 \
  LOVD_ARTIFACTS="$artifacts" \
  "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rs --ignore=tests/e2e --ignore=tests/bench \
  --ignore=tests/packaging \
  "$@" || status=$?

echo "==> pytest as root (packaging helpers: root never follows the lovd user's links)"
"$VENV/bin/python" -m pytest -p no:cacheprovider -q -rs tests/packaging || status=$?

if [ -d tests/e2e ] && [ -z "${LOVD_SKIP_E2E:-}" ]; then
  echo "==> pytest as root (systemd end-to-end in a booted machine)"
  "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rs tests/e2e || status=$?
fi
exit $status
