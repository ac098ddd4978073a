#!/usr/bin/env bash
# Prepare a Debian 12 host for lovd: packages, the unprivileged `lovd` user with
# subordinate ids, its rootless Podman configuration, a venv with lovd installed,
# and the session images. Idempotent: safe to run again after every pull (running
# sessions keep running: Podman is migrated only when its configuration changed).
#
#   sudo packaging/setup-host.sh            # everything
#   LOVD_SKIP_APT=1 packaging/setup-host.sh # skip apt (already installed)
#
# Environment: LOVD_USER, LOVD_HOME (its parent directories must be root's alone),
# LOVD_VENV, LOVD_SUBID_START, LOVD_SUBID_COUNT; LOVD_SKIP_APT=1; LOVD_SKIP_VENV=1 (use the
# venv as it is: no pip); LOVD_SKIP_IMAGES=1 (build no session image) or
# LOVD_SKIP_OPENCODE_IMAGE=1 (only the test image).
#
# Everything below LOVD_HOME belongs to the lovd user, who may have replaced any of it
# with a link: root only creates LOVD_HOME itself, and writes the user's files as the
# user (lib.sh, "Root and the paths the lovd user controls").
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
# Not wherever root happened to be: python -c would import from the working directory.
cd /
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/packaging/lib.sh"
LOVD_USER=${LOVD_USER:-lovd}
LOVD_HOME=${LOVD_HOME:-/var/lib/lovd}
VENV=${LOVD_VENV:-/opt/lovd/venv}
SUBID_START=${LOVD_SUBID_START:-524288}
SUBID_COUNT=${LOVD_SUBID_COUNT:-1048576}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host.sh configures system users and packages: run it as root (sudo)." >&2
  exit 2
fi

if [ -z "${LOVD_SKIP_APT:-}" ]; then
  pkgs=(podman runc crun conmon uidmap slirp4netns fuse-overlayfs catatonit caddy
        systemd-container dbus-user-session busybox-static debootstrap nftables
        postgresql chromium chromium-driver python3-venv curl)
  ensure_packages "${pkgs[@]}"
  # Debian enables these on install; lovd drives its own Caddy and tests own
  # their PostgreSQL clusters, so the stock services must not hold :80 / :5432.
  for svc in caddy postgresql; do
    if [ -d /run/systemd/system ]; then systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
  done
fi

# slirp4netns (rootless networking) opens /dev/net/tun; 0666 is the usual mode.
if [ -e /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ]; then
  chmod 0666 /dev/net/tun
fi

# Before the user exists: its home must be a directory only root can replace.
root_only_parents "$LOVD_HOME" >/dev/null || exit 1
if ! id "$LOVD_USER" >/dev/null 2>&1; then
  log "creating user $LOVD_USER"
  # No --create-home: owned_dir makes it (and a system user needs no skeleton files).
  useradd --system --user-group --home-dir "$LOVD_HOME" --no-create-home \
    --shell /usr/sbin/nologin --comment "lovd session daemon" "$LOVD_USER"
fi
owned_dir "$LOVD_USER" "$LOVD_USER" 0750 "$LOVD_HOME"
# New subordinate ids reach Podman's user namespace only through a migrate (below).
PODMAN_CONFIG_CHANGED=
if ! grep -q "^$LOVD_USER:" /etc/subuid; then
  usermod --add-subuids "$SUBID_START-$((SUBID_START + SUBID_COUNT - 1))" "$LOVD_USER"
  PODMAN_CONFIG_CHANGED=1
fi
if ! grep -q "^$LOVD_USER:" /etc/subgid; then
  usermod --add-subgids "$SUBID_START-$((SUBID_START + SUBID_COUNT - 1))" "$LOVD_USER"
  PODMAN_CONFIG_CHANGED=1
fi
uid=$(id -u "$LOVD_USER")

# Podman for the lovd user (lib.sh: the same files install.sh writes).
cfg="$LOVD_HOME/.config/containers"
# As the user: these paths are the user's to replace (lib.sh).
owner_mkdir "$LOVD_USER" 0700 "$LOVD_HOME/.config" "$cfg"
podman_user_config "$LOVD_USER" "$cfg"

if [ -d /run/systemd/system ] && [ "$(ps -p 1 -o comm=)" = systemd ]; then
  loginctl enable-linger "$LOVD_USER"
else
  # No systemd: give the user a runtime dir as pam_systemd would.
  owned_dir root root 0755 /run/user
  owned_dir "$LOVD_USER" "$LOVD_USER" 0700 "/run/user/$uid"
fi

if [ -z "${LOVD_SKIP_VENV:-}" ]; then
  log "installing lovd into $VENV"
  install -d -m 0755 "$(dirname "$VENV")"
  # Debian's interpreter, so the unprivileged lovd user can run the venv.
  [ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "${here}[dev]"
fi

as_lovd() { runuser -u "$LOVD_USER" -- env -C "$LOVD_HOME" HOME="$LOVD_HOME" XDG_RUNTIME_DIR="/run/user/$uid" "$@"; }
if [ -n "$PODMAN_CONFIG_CHANGED" ]; then
  # Only after a change: migrate stops every running container of the user (lib.sh).
  log "Podman configuration changed: podman system migrate"
  # Migrate restarts Podman's pause process: a running API service (podman.socket's)
  # would stay in the old namespaces and no longer see new containers' network
  # namespaces, so it is stopped first; the socket starts it again on demand.
  if [ -d /run/systemd/system ] && [ "$(ps -p 1 -o comm=)" = systemd ]; then
    systemctl --user --machine="$LOVD_USER@" stop podman.service >/dev/null 2>&1 || true
  fi
  as_lovd podman system migrate >/dev/null 2>&1 || true
fi

if [ -z "${LOVD_SKIP_IMAGES:-}" ]; then
  log "building the test session image"
  as_lovd "$VENV/bin/lovd" image build --test >/dev/null
  if [ -z "${LOVD_SKIP_OPENCODE_IMAGE:-}" ]; then
    log "building the OpenCode session image"
    as_lovd "$VENV/bin/lovd" image build
  fi
fi
log "host ready: run 'lovd doctor' as $LOVD_USER to check it"
