#!/usr/bin/env bash
# Quick start: prepare this host and run lovd's main job.
#
# On a host where systemd is PID 1 this installs lovd as a system service
# (packaging/install.sh) and starts it through socket activation. Elsewhere
# (containers, CI VMs) it runs the same daemon in the foreground as the lovd user.
# With no LLM key and no Lovdata MCP URL configured, the demo stand-ins are used.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
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
if [ ! -f "$CONF" ]; then
  install -m 0640 -g lovd "$here/lovd.conf.example" "$CONF"
fi
install -d -o lovd -g lovd -m 0750 /run/lovd
uid=$(id -u lovd)
echo "==> running lovd in the foreground (Ctrl-C stops lovd; sessions keep running)"
echo "    in another shell: sudo -u lovd $VENV/bin/lovd session create"
exec runuser -u lovd -- env -C /var/lib/lovd HOME=/var/lib/lovd XDG_RUNTIME_DIR="/run/user/$uid" \
  PATH="$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" LOVD_CONFIG="$CONF" \
  "$VENV/bin/lovd" serve
