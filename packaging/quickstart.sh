#!/usr/bin/env bash
# Quick start: prepare this host and run lovd's main job.
#
# On a host where systemd is PID 1 this installs lovd as a system service
# (packaging/install.sh) and starts it through socket activation. Elsewhere
# (containers, CI VMs) it runs the same daemon in the foreground as the lovd user.
# With no LLM key and no Lovdata MCP URL configured, the demo stand-ins are used.
#
#   packaging/quickstart.sh      (as root, or as a user who may use sudo)
set -euo pipefail

# It installs packages and a system user, so it runs as root. The README's command works
# as written both in a root shell (a fresh VM often has no sudo at all) and from an
# account with sudo: then it asks sudo to run it again, keeping the LOVD_* settings.
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    keep=$(compgen -e | grep -E '^(LOVD_[A-Z0-9_]*|CI)$' | paste -sd, -) || true
    exec sudo ${keep:+--preserve-env="$keep"} -- "$0" "$@"
  fi
  echo "quickstart.sh installs packages and a system user: run it as root" \
    "(su -c '$0'), or install sudo" >&2
  exit 2
fi

here=$(cd "$(dirname "$0")/.." && pwd)
# lovd runs from this checkout as the unprivileged lovd user (the venv is an editable
# install of it): a clone in root's home (/root is 0700) fails much later with
# "Permission denied". Say so before installing anything.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/packaging/lib.sh"
reachable_by_others "$here" quickstart.sh
VENV=${LOVD_VENV:-/opt/lovd/venv}
CONF=${LOVD_CONFIG:-/etc/lovd/lovd.conf}
# How an operator runs lovd's CLI as the lovd user from this shell.
if command -v sudo >/dev/null 2>&1; then as_user="sudo -u lovd"; else as_user="runuser -u lovd --"; fi

bash "$here/packaging/setup-host.sh"

if [ "$(ps -p 1 -o comm=)" = systemd ] && [ -x "$here/packaging/install.sh" ]; then
  bash "$here/packaging/install.sh"
  echo "lovd is installed and socket-activated. Try:"
  echo "  $as_user $VENV/bin/lovd session create"
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
limits:
  # Without systemd the lovd user has no user manager to hold cgroup v2 controllers, so
  # a session's memory and CPU limits cannot be enforced (its process count still is,
  # by rlimit). A demo; for production install under systemd (lovd doctor: limits).
  enforce: false
CONF
  chgrp lovd "$CONF" && chmod 0640 "$CONF"
  echo "note: $CONF sets limits.enforce: false: without systemd this host cannot enforce a" \
    "session's memory and CPU limits (only its process count); fine for a demo, not for" \
    "production -- 'lovd doctor' shows how each limit is enforced" >&2
fi
uid=$(id -u lovd)
# Without systemd, Caddy runs beside lovd as the same unprivileged user (port 8080);
# its admin socket only carries lovd's pushed server, see caddy/Caddyfile.
caddy_conf=$(mktemp /tmp/lovd-caddy.XXXXXX.json)
printf '{"admin":{"listen":"unix//run/lovd/caddy-admin.sock","config":{"persist":false}}}' > "$caddy_conf"
chmod 0644 "$caddy_conf"
# Caddy gets a process group of its own (setsid; $! is its leader, runuser): the exit
# trap stops that whole group. A background job of a script ignores Ctrl-C, and killing
# only the shell that started it left runuser and Caddy running.
# The log is opened by lovd, not by root's shell: ~lovd/caddy.log may be a planted link.
# shellcheck disable=SC2016 # expanded by the inner shell, as lovd
setsid runuser -u lovd -- env -C /var/lib/lovd HOME=/var/lib/lovd \
  PATH="$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  sh -c 'exec caddy run --config "$1" > "$HOME/caddy.log" 2>&1' caddy "$caddy_conf" &
caddy_pid=$!
lovd_pid=""
grace=0
stop_all() {
  # After a Ctrl-C the terminal has signalled lovd too and it is shutting down: let it
  # finish (up to 10 s) before asking again, which would make it exit at once.
  for _ in $(seq 1 "$grace"); do
    kill -0 "$lovd_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -n "$lovd_pid" ] && kill -TERM "$lovd_pid" 2>/dev/null; then
    wait "$lovd_pid" 2>/dev/null || true
  fi
  if kill -TERM -- "-$caddy_pid" 2>/dev/null; then
    wait "$caddy_pid" 2>/dev/null || true
    echo "==> lovd and Caddy stopped" >&2
  fi
  rm -f "$caddy_conf"
}
trap stop_all EXIT
trap 'grace=100; exit 130' INT  # so the EXIT trap also runs when interrupted or signalled
trap 'exit 143' TERM
echo "==> lovd runs in the foreground; open http://localhost:8080/ for a legal-research chat"
echo "    (Ctrl-C stops lovd and Caddy; session containers keep running)"
echo "    operator CLI: $as_user $VENV/bin/lovd --socket /run/lovd/api.sock session list"
# lovd runs as a job this shell waits for (not as its foreground command): a signal to
# this script alone -- sudo passing on a TERM, a kill of its pid -- then runs the traps
# at once; bash runs no trap while a foreground command is still running. runuser is
# $! itself (no function around it), and passes a TERM on to lovd.
runuser -u lovd -- env -C /var/lib/lovd HOME=/var/lib/lovd XDG_RUNTIME_DIR="/run/user/$uid" \
  PATH="$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" LOVD_CONFIG="$CONF" "$VENV/bin/lovd" serve &
lovd_pid=$!
wait "$lovd_pid"
