#!/bin/sh
# Install the browser tests' node dependencies into tests/browser/node_modules.
# playwright-core never downloads a browser; the tests use Debian's chromium
# (apt-get install -y chromium).
set -eu
cd "$(dirname "$0")"
command -v npm >/dev/null || { echo "npm missing: apt-get install -y npm" >&2; exit 1; }
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --loglevel=error
