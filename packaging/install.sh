#!/usr/bin/env bash
# Install lovd on a host where systemd is PID 1 (Debian 12 or similar).
#
#   sudo packaging/install.sh                    # install or upgrade (idempotent)
#   sudo packaging/install.sh --uninstall        # remove lovd but keep its data
#   sudo packaging/install.sh --uninstall --purge  # ... and the data, config and user
#
# What "install" does, in order:
#   packages (apt, only what is missing) · the lovd user and the lovd-api and lovd-web
#   groups (sysusers.d), with subordinate uid/gid ranges · tmpfiles.d · lovd into its own
#   venv · the units, the user@.service delegation drop-in and a per-host lovd.service
#   drop-in (the lovd user's uid) · /etc/lovd/lovd.conf (only if absent) · linger for
#   lovd · lovd's rootless Podman config · its podman.socket · the session image (built
#   as lovd) ·
#   `systemctl enable --now lovd.socket lovd-auth.socket lovd-broker.socket`.
#
# Environment:
#   LOVD_IMAGE=full|test|none   which session image to build (default full: OpenCode;
#                               test: the tiny busybox image, for tests). An existing
#                               image is kept unless LOVD_REBUILD_IMAGE=1.
#   LOVD_SKIP_APT=1             do not install packages
#   LOVD_VENV=/opt/lovd/venv    where lovd is installed; LOVD_REINSTALL=1 forces pip
#   LOVD_SUBID_COUNT=1048576    size of lovd's subordinate id range (--userns=auto needs
#                               65536 per container by default)
#
# Everything below /var/lib/lovd belongs to the lovd user, who may have replaced any of it
# with a link: root writes nothing there itself -- the user's own files are written as the
# user (lib.sh, "Root and the paths the lovd user controls").
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Not wherever root happened to be (say ~lovd): python -c would import from there.
cd /
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$SRC/packaging/lib.sh"
LOVD_USER=lovd
# Members may use the operator API (/run/lovd/api.sock): operators, never the web server.
API_GROUP=lovd-api
# Members may use the browser path (/run/lovd/auth.sock): the web server (Caddy) only.
WEB_GROUP=lovd-web
STATE=/var/lib/lovd
VENV=${LOVD_VENV:-/opt/lovd/venv}
ETC=/etc/lovd
UNIT_DIR=/etc/systemd/system
SHARE=/usr/share/lovd
SUBID_COUNT=${LOVD_SUBID_COUNT:-1048576}
IMAGE_KIND=${LOVD_IMAGE:-full}
TEST_IMAGE=localhost/lovd-test:latest

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

mode=install
purge=
for arg in "$@"; do
  case $arg in
    --uninstall) mode=uninstall ;;
    --purge) purge=1 ;;
    # The comment block at the top (not "$0": a relative path no longer leads there from /).
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$SRC/packaging/install.sh"; exit 0 ;;
    *) die "unknown argument $arg (see --help)" ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (it creates a system user and installs units)"
[ -d /run/systemd/system ] || die "systemd is not running as PID 1 here; use packaging/setup-host.sh for hosts without systemd"

uid_of() { id -u "$LOVD_USER" 2>/dev/null; }
user_ctl() { systemctl --user --machine="$LOVD_USER@" "$@"; }

as_lovd() {
  local uid; uid=$(uid_of)
  runuser -u "$LOVD_USER" -- env -C "$STATE" HOME="$STATE" USER="$LOVD_USER" LOGNAME="$LOVD_USER" \
    XDG_RUNTIME_DIR="/run/user/$uid" DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/$uid/bus" \
    PATH=/usr/local/bin:/usr/bin:/bin "$@"
}

# ---------------------------------------------------------------- uninstall
uninstall() {
  local uid; uid=$(uid_of || true)
  log "stopping lovd"
  systemctl disable --now lovd.socket lovd-auth.socket lovd-broker.socket lovd.service \
    >/dev/null 2>&1 || true
  if [ -n "$uid" ] && systemctl is-active --quiet "user@$uid.service"; then
    log "stopping session units of the $LOVD_USER user"
    user_ctl stop 'lovd-session-*.service' >/dev/null 2>&1 || true
    user_ctl reset-failed 'lovd-session-*.service' >/dev/null 2>&1 || true
    user_ctl disable --now podman.socket >/dev/null 2>&1 || true
  fi
  if [ -n "$uid" ]; then loginctl disable-linger "$LOVD_USER" 2>/dev/null || true; fi
  rm -f "$UNIT_DIR/lovd.socket" "$UNIT_DIR/lovd-auth.socket" "$UNIT_DIR/lovd-broker.socket" \
        "$UNIT_DIR/lovd.service" \
        "$UNIT_DIR/user@.service.d/lovd-delegate.conf" \
        /etc/sysusers.d/lovd.conf /etc/tmpfiles.d/lovd.conf
  rm -rf "$UNIT_DIR/lovd.service.d" "$SHARE"
  rmdir "$UNIT_DIR/user@.service.d" 2>/dev/null || true
  rm -rf "$VENV"
  rmdir "$(dirname "$VENV")" 2>/dev/null || true
  systemctl daemon-reload
  if [ -n "$purge" ]; then
    log "purging data, configuration and the $LOVD_USER user"
    if [ -n "$uid" ]; then
      systemctl stop "user@$uid.service" >/dev/null 2>&1 || true
      pkill -KILL -U "$uid" 2>/dev/null || true
    fi
    # Workspaces belong to lovd's subordinate ids; root removes them regardless.
    rm -rf "$ETC"
    # $STATE may be a mount point: empty it, then try to remove it. Root deletes below a
    # directory lovd controlled, so: find -P (the default) removes a planted link itself,
    # never what it points to; GNU find checks that it entered the directory it examined
    # (find's "Security Considerations"), so a directory swapped for a link mid-walk is
    # not followed; -xdev keeps it off other file systems (e.g. a FUSE mount lovd made
    # there with fusermount).
    if [ -d "$STATE" ] && [ ! -L "$STATE" ]; then
      find -P "$STATE" -xdev -mindepth 1 -delete 2>/dev/null || true
      rmdir "$STATE" 2>/dev/null || true
    fi
    sed -i "/^$LOVD_USER:/d" /etc/subuid /etc/subgid
    userdel "$LOVD_USER" 2>/dev/null || true
    groupdel "$API_GROUP" 2>/dev/null || true
    groupdel "$WEB_GROUP" 2>/dev/null || true
    groupdel "$LOVD_USER" 2>/dev/null || true
  else
    log "kept: $STATE (data, Podman store), $ETC (config), the $LOVD_USER user; --purge removes them"
  fi
  log "lovd uninstalled"
}

if [ "$mode" = uninstall ]; then uninstall; exit 0; fi

# ---------------------------------------------------------------- packages
if [ -z "${LOVD_SKIP_APT:-}" ]; then
  pkgs=(podman runc crun conmon uidmap slirp4netns fuse-overlayfs catatonit
        dbus-user-session busybox-static python3-venv curl)
  ensure_packages "${pkgs[@]}"
fi
# slirp4netns (rootless networking) opens /dev/net/tun; 0666 is the usual mode.
if [ -e /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ]; then chmod 0666 /dev/net/tun; fi

# ---------------------------------------------------------------- user, ids, dirs
log "user $LOVD_USER, groups $API_GROUP and $WEB_GROUP (sysusers.d)"
install -D -m 0644 "$SRC/units/lovd.sysusers" /etc/sysusers.d/lovd.conf
systemd-sysusers /etc/sysusers.d/lovd.conf
uid=$(uid_of) || die "systemd-sysusers did not create $LOVD_USER"

# --userns=auto takes container ids from these ranges: pick one that overlaps nobody's.
next_free_subid() {
  awk -F: 'BEGIN { end = 524288 } NF >= 3 { e = $2 + $3; if (e > end) end = e } END { print end }' \
    /etc/subuid /etc/subgid 2>/dev/null
}
touch /etc/subuid /etc/subgid
start=$(next_free_subid)
for f in subuid subgid; do
  if ! grep -q "^$LOVD_USER:" "/etc/$f"; then
    log "subordinate ${f#sub}s for $LOVD_USER: $start-$((start + SUBID_COUNT - 1))"
    echo "$LOVD_USER:$start:$SUBID_COUNT" >> "/etc/$f"
  fi
done

install -D -m 0644 "$SRC/units/lovd.tmpfiles" /etc/tmpfiles.d/lovd.conf
systemd-tmpfiles --create /etc/tmpfiles.d/lovd.conf

# ---------------------------------------------------------------- lovd itself
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  install -d -m 0755 "$(dirname "$VENV")"
  # Debian's interpreter, so the unprivileged lovd user can run the venv.
  /usr/bin/python3 -m venv "$VENV"
fi
# A regular (not editable) install of this source: the hardened service cannot see a
# checkout in /tmp or /home, so an editable install would not import there.
installed_ok() {
  "$VENV/bin/python" -I - "$SRC" <<'PY' 2>/dev/null
import sys, pathlib, aiohttp, sdnotify, lovd
src = pathlib.Path(sys.argv[1], "lovd", "__init__.py").read_text()
inside = pathlib.Path(lovd.__file__).resolve().is_relative_to(pathlib.Path(sys.prefix).resolve())
sys.exit(0 if inside and f'"{lovd.__version__}"' in src else 1)
PY
}
if [ -n "${LOVD_REINSTALL:-}" ] || ! installed_ok; then
  log "installing lovd into $VENV"
  build=$(mktemp -d)
  # Build from a copy: the source may be read-only (setuptools writes egg-info into it).
  cp -a "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/lovd" "$build/"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q --force-reinstall --no-deps "$build" && \
    "$VENV/bin/pip" install -q "$build"
  rm -rf "$build"
fi
"$VENV/bin/lovd" version >/dev/null || die "$VENV/bin/lovd does not run"
# Image build scripts for `lovd image build` outside a source checkout.
install -d -m 0755 "$SHARE"
rm -rf "$SHARE/packaging.new"
mkdir -p "$SHARE/packaging.new"
cp -r "$SRC/packaging/images" "$SRC/packaging/lib.sh" "$SHARE/packaging.new/"
[ -d "$SRC/config_opencode" ] && cp -r "$SRC/config_opencode" "$SHARE/"
rm -rf "$SHARE/packaging" && mv "$SHARE/packaging.new" "$SHARE/packaging"

# ---------------------------------------------------------------- config
install -d -m 0750 -o root -g "$LOVD_USER" "$ETC"
if [ ! -e "$ETC/lovd.conf" ]; then
  log "writing $ETC/lovd.conf"
  if [ -f "$SRC/lovd.conf.example" ]; then
    # Under systemd the sessions must run in the user manager (the hardened unit
    # cannot exec podman), so the runner is pinned rather than auto-detected.
    sed -e 's|^runner:.*|runner: "systemd"|' \
        -e "s|^  socket: \"\"|  socket: \"/run/user/$uid/podman/podman.sock\"|" \
        "$SRC/lovd.conf.example" > "$ETC/lovd.conf.tmp"
  else
    printf 'runner: "systemd"\npodman:\n  socket: "/run/user/%s/podman/podman.sock"\n' "$uid" \
      > "$ETC/lovd.conf.tmp"
  fi
  if [ "$IMAGE_KIND" = test ]; then
    sed -i 's|^image:.*|image: "'"$TEST_IMAGE"'"|' "$ETC/lovd.conf.tmp"
    grep -q '^image:' "$ETC/lovd.conf.tmp" || echo "image: \"$TEST_IMAGE\"" >> "$ETC/lovd.conf.tmp"
  fi
  chown root:"$LOVD_USER" "$ETC/lovd.conf.tmp"
  chmod 0640 "$ETC/lovd.conf.tmp"
  mv "$ETC/lovd.conf.tmp" "$ETC/lovd.conf"
fi
"$VENV/bin/lovd" --config "$ETC/lovd.conf" version >/dev/null \
  || die "$ETC/lovd.conf is not valid (see the error above)"

# ---------------------------------------------------------------- units
log "installing units"
install -m 0644 "$SRC/units/lovd.socket" "$SRC/units/lovd-auth.socket" \
  "$SRC/units/lovd-broker.socket" "$SRC/units/lovd.service" "$UNIT_DIR/"
if [ "$VENV" != /opt/lovd/venv ]; then
  sed -i "s|/opt/lovd/venv|$VENV|" "$UNIT_DIR/lovd.service"
fi
install -D -m 0644 "$SRC/units/user@.service.d/delegate.conf" "$UNIT_DIR/user@.service.d/lovd-delegate.conf"
install -d -m 0755 "$UNIT_DIR/lovd.service.d"
cat > "$UNIT_DIR/lovd.service.d/10-user-manager.conf" <<EOF
# Written by packaging/install.sh for this host: lovd's uid is $uid.
# lovd starts session units in user@$uid.service over its bus and lists containers
# through its Podman API socket, both under /run/user/$uid (hidden by ProtectHome=).
[Unit]
Wants=user@$uid.service
After=user@$uid.service
[Service]
BindPaths=/run/user/$uid
Environment=XDG_RUNTIME_DIR=/run/user/$uid DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/$uid/bus
EOF
systemctl daemon-reload

# Caddy (if installed) reaches the browser path's socket through lovd-web, and must not
# reach the operator API: a hole in the web server facing the internet would otherwise
# create, list and delete sessions. Earlier versions put it in lovd-api; take it out.
in_group() { id -nG "$1" | tr ' ' '\n' | grep -qx "$2"; }
if id caddy >/dev/null 2>&1; then
  caddy_changed=
  if in_group caddy "$API_GROUP"; then
    log "removing caddy from $API_GROUP (it reaches lovd through $WEB_GROUP now)"
    gpasswd -d caddy "$API_GROUP" >/dev/null \
      || die "could not remove caddy from $API_GROUP (its primary group?)"
    caddy_changed=1
  fi
  if ! in_group caddy "$WEB_GROUP"; then
    usermod -a -G "$WEB_GROUP" caddy
    caddy_changed=1
  fi
  # A running Caddy keeps the groups it started with.
  if [ -n "$caddy_changed" ]; then
    if systemctl is-active --quiet caddy.service; then
      systemctl restart caddy.service
    else
      log "caddy's groups changed: restart any Caddy you run yourself"
    fi
  fi
fi

# ---------------------------------------------------------------- the user manager
log "enabling linger for $LOVD_USER (its systemd manager runs without a login)"
loginctl enable-linger "$LOVD_USER"
systemctl start "user@$uid.service"
for _ in $(seq 100); do
  [ -S "/run/user/$uid/bus" ] && [ -S "/run/user/$uid/systemd/private" ] && break
  sleep 0.1
done
[ -S "/run/user/$uid/bus" ] || die "user@$uid.service has no bus at /run/user/$uid/bus (is dbus-user-session installed?)"

# ---------------------------------------------------------------- rootless Podman
log "configuring rootless Podman for $LOVD_USER"
cfg="$STATE/.config/containers"
# As lovd: these paths are lovd's to replace (lib.sh).
owner_mkdir "$LOVD_USER" 0700 "$STATE/.config" "$cfg"
PODMAN_CONFIG_CHANGED=
podman_user_config "$LOVD_USER" "$cfg"  # lib.sh: the same files setup-host.sh writes
if [ -n "$PODMAN_CONFIG_CHANGED" ]; then
  # Only when the config changed: migrate restarts Podman's pause process (and with it
  # every running container), and an API service still inside the old namespaces could
  # no longer see new containers' network namespaces; the socket restarts it on demand.
  user_ctl stop podman.service >/dev/null 2>&1 || true
  as_lovd podman system migrate >/dev/null 2>&1 || true
fi
as_lovd podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' >/dev/null \
  || die "rootless podman does not work for $LOVD_USER (see the error above)"
user_ctl enable --now podman.socket >/dev/null 2>&1 || user_ctl enable --now podman.socket
for _ in $(seq 50); do [ -S "/run/user/$uid/podman/podman.sock" ] && break; sleep 0.1; done

# ---------------------------------------------------------------- session image
build_test_image_fallback() {
  # The test image (used only if packaging/images/test/build.sh is absent): static
  # busybox serving /www on :4096 with /global/health.
  local root; root=$(mktemp -d)
  mkdir -p "$root/bin" "$root/www/global" "$root/run/secrets" "$root/tmp" "$root/etc" "$root/work"
  cp /bin/busybox "$root/bin/busybox"
  for a in sh cat ls id kill sleep httpd; do ln -s busybox "$root/bin/$a"; done
  echo '{"healthy":true}' > "$root/www/global/health"
  echo 'lovd test session' > "$root/www/index.html"
  tar -C "$root" -c . | as_lovd podman import \
    --change 'CMD ["/bin/busybox", "httpd", "-f", "-p", "4096", "-h", "/www"]' - "$TEST_IMAGE" >/dev/null
  rm -rf "$root"
}
case $IMAGE_KIND in
  none) ;;
  test|full)
    if [ "$IMAGE_KIND" = test ]; then image=$TEST_IMAGE; flag=--test
    else
      image=$("$VENV/bin/python" -I -c 'import sys; from lovd import config; print(config.load(sys.argv[1]).image)' "$ETC/lovd.conf")
      flag=
    fi
    if [ -n "${LOVD_REBUILD_IMAGE:-}" ] || ! as_lovd podman image exists "$image"; then
      log "building the session image $image as $LOVD_USER"
      if [ "$IMAGE_KIND" = test ] && [ ! -f "$SHARE/packaging/images/test/build.sh" ]; then
        build_test_image_fallback
      else
        as_lovd env LOVD_PACKAGING_DIR="$SHARE/packaging" \
          "$VENV/bin/lovd" --config "$ETC/lovd.conf" image build $flag
      fi
    fi ;;
  *) die "LOVD_IMAGE must be full, test or none" ;;
esac

# ---------------------------------------------------------------- start
sockets=(lovd.socket lovd-auth.socket lovd-broker.socket)
log "enabling ${sockets[*]}"
# lovd tells the sockets systemd passes it apart by address: lovd-broker.socket must
# listen where lovd.conf puts the broker (a drop-in may move it).
broker=$("$VENV/bin/python" -I -c 'import sys; from lovd import config; print(config.load(sys.argv[1]).broker_listen)' "$ETC/lovd.conf")
listen=$(systemctl show -P Listen lovd-broker.socket)
[ "$listen" = "$broker (Stream)" ] || die "lovd-broker.socket listens on '${listen% (Stream)}' but broker.listen in $ETC/lovd.conf is '$broker': change one (systemctl edit lovd-broker.socket: ListenStream= then ListenStream=$broker)"
# An upgrade: a socket keeps the owner, group and mode it was created with (e.g. auth.sock
# in lovd-api before lovd-web existed) until it is re-created, which systemd refuses
# while lovd.service runs; the sockets queue connections while lovd restarts.
sock_is() { [ ! -S "$1" ] || [ "$(stat -c '%U:%G %a' "$1")" = "$2" ]; }
if ! sock_is /run/lovd/api.sock "$LOVD_USER:$API_GROUP 660" \
   || ! sock_is /run/lovd/auth.sock "$LOVD_USER:$WEB_GROUP 660"; then
  log "re-creating lovd's sockets with the units' owner and mode"
  systemctl stop lovd.service
  systemctl restart lovd.socket lovd-auth.socket
fi
# An upgrade from before lovd-broker.socket: that lovd binds the broker's port itself,
# so the socket could not; lovd starts again through its sockets.
if ! systemctl is-active --quiet lovd-broker.socket; then systemctl stop lovd.service; fi
systemctl enable --now "${sockets[@]}"
# An upgrade: a running daemon picks up the new code and units.
systemctl try-restart lovd.service
if command -v curl >/dev/null; then
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 60 --unix-socket /run/lovd/api.sock http://lovd/api/health || true)
  log "lovd API health: HTTP $code (curl --unix-socket /run/lovd/api.sock http://lovd/api/health)"
fi
log "done. Operators: usermod -aG $API_GROUP USER to use the lovd CLI (never the web server's user); logs: journalctl -u lovd"
