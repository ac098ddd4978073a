#!/usr/bin/env bash
# Quick start: prepare this host and run lovd's main job.
#
# On a host where systemd is PID 1 this installs lovd as a system service
# (packaging/install.sh) and starts it through socket activation. Elsewhere
# (containers, CI VMs) it runs the same daemon in the foreground as the lovd user.
# With no LLM key and no Lovdata MCP URL configured, the demo stand-ins are used.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/packaging/lib.sh"
VENV=${LOVD_VENV:-/opt/lovd/venv}
CONF=${LOVD_CONFIG:-/etc/lovd/lovd.conf}

if [ "$(id -u)" -ne 0 ]; then
  echo "quickstart.sh installs packages and a system user: run it with sudo" >&2
  exit 2
fi
bash "$here/packaging/setup-host.sh"

if [ "$(ps -p 1 -o comm=)" = systemd ] && [ -x "$here/packaging/install.sh" ]; then
  bash "$here/packaging/install.sh"
  echo "lovd is installed and socket-activated. Try:"
  echo "  sudo -u lovd lovd session create"
  echo "  curl --unix-socket /run/lovd/api.sock http://lovd/api/health"
  exit 0
fi

install -d -m 0755 /etc/lovd
# lovd binds its sockets here itself (no systemd to hold them); /run is root's alone.
owned_dir lovd lovd 0755 /run/lovd
if [ ! -f "$CONF" ]; then
  # Everything not set here has the default documented in lovd.conf.example.
  cat > "$CONF" <<CONF
# Written by packaging/quickstart.sh; every other key is in lovd.conf.example.
public_url: "http://localhost:8080"
caddy:
  admin: "unix//run/lovd/caddy-admin.sock"
  listen: [":8080"]
CONF
  chgrp lovd "$CONF" && chmod 0640 "$CONF"
fi
uid=$(id -u lovd)
as_lovd() {
  runuser -u lovd -- env -C /var/lib/lovd HOME=/var/lib/lovd XDG_RUNTIME_DIR="/run/user/$uid" \
    PATH="$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" LOVD_CONFIG="$CONF" "$@"
}
# Without systemd, Caddy runs beside lovd as the same unprivileged user (port 8080);
# its admin socket only carries lovd's pushed server, see caddy/Caddyfile.
caddy_conf=$(mktemp /tmp/lovd-caddy.XXXXXX.json)
printf '{"admin":{"listen":"unix//run/lovd/caddy-admin.sock","config":{"persist":false}}}' > "$caddy_conf"
chmod 0644 "$caddy_conf"
# The log is opened by lovd, not by root's shell: ~lovd/caddy.log may be a planted link.
# shellcheck disable=SC2016 # expanded by the inner shell, as lovd
as_lovd sh -c 'exec caddy run --config "$1" > "$HOME/caddy.log" 2>&1' caddy "$caddy_conf" &
caddy_pid=$!
trap 'kill $caddy_pid 2>/dev/null; rm -f "$caddy_conf"' EXIT
trap 'exit 130' INT TERM  # so the EXIT trap also runs when we are signalled
echo "==> lovd runs in the foreground; open http://localhost:8080/ for a legal-research chat"
echo "    (Ctrl-C stops lovd and Caddy; session containers keep running)"
echo "    operator CLI: sudo -u lovd $VENV/bin/lovd --socket /run/lovd/api.sock session list"
as_lovd "$VENV/bin/lovd" serve
