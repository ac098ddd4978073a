#!/bin/bash
# Build lovd's tiny test image (busybox httpd standing in for OpenCode).
#
#   packaging/images/test/build.sh [TAG]      (default localhost/lovd-test:latest)
#
# Run it as the user whose rootless Podman runs the sessions. No registry, no network:
# the root filesystem is busybox-static plus a few files, imported with `podman import`.
#
# The container answers like the session image where lovd looks: GET /global/health →
# {"healthy":true}, / → a page containing "lovd test session", /cgi-bin/echo → the
# session id and a few variables from the secret; HTTP Basic auth (user "opencode") when
# OPENCODE_SERVER_PASSWORD is in /run/secrets/lovd.env. It runs as uid 1000 like the
# session image, so lovd mounts the secret with the same uid for both.
set -euo pipefail

TAG=${1:-localhost/lovd-test:latest}
BUSYBOX_BIN=${BUSYBOX_BIN:-/bin/busybox}
IMAGE_UID=1000
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../lib.sh
. "$HERE/../../lib.sh"

die() { echo "build.sh: $*" >&2; exit 1; }
[ "$(id -u)" != 0 ] || die "run as the unprivileged user that runs the sessions (e.g. lovd), not root"
command -v podman >/dev/null || die "podman not found"
[ -x "$BUSYBOX_BIN" ] || die "busybox not found at $BUSYBOX_BIN (apt-get install busybox-static)"
# A dynamically linked busybox would need its libraries in the image.
if ldd "$BUSYBOX_BIN" >/dev/null 2>&1; then die "$BUSYBOX_BIN is not static (apt-get install busybox-static)"; fi

start=$(date +%s.%N)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lovd-test-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/rootfs

mkdir -p "$ROOT"/{bin,etc,tmp,work,run/secrets,proc,sys,dev,www/global,www/cgi-bin}
chmod 1777 "$ROOT/tmp"
cp "$BUSYBOX_BIN" "$ROOT/bin/busybox"
for applet in sh cat env id ls mkdir printf sleep wget httpd echo; do
    ln -s busybox "$ROOT/bin/$applet"
done
install -m 0755 "$HERE/lovd-entrypoint" "$ROOT/bin/lovd-entrypoint"
install -m 0755 "$HERE/lovd-httpd" "$ROOT/bin/lovd-httpd"

printf '{"healthy":true,"version":"lovd-test"}' >"$ROOT/www/global/health"
cat >"$ROOT/www/index.html" <<'HTML'
<!doctype html>
<html><head><meta charset="utf-8"><title>lovd test session</title></head>
<body><h1>lovd test session</h1><p>busybox httpd standing in for OpenCode.</p></body></html>
HTML
cat >"$ROOT/www/cgi-bin/echo" <<'CGI'
#!/bin/sh
# Shows which settings reached the container (never the password itself).
printf 'Content-Type: application/json\r\n\r\n'
printf '{"session_id":"%s","mcp_url":"%s","model":"%s","uid":%s,"password_set":%s}\n' \
    "${LOVD_SESSION_ID:-}" "${LOVDATA_MCP_URL:-}" "${LOVD_MODEL:-}" "$(id -u)" \
    "$([ -n "${OPENCODE_SERVER_PASSWORD:-}" ] && echo true || echo false)"
CGI
chmod 0755 "$ROOT/www/cgi-bin/echo"

cat >"$ROOT/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/bin/sh
opencode:x:$IMAGE_UID:$IMAGE_UID:test session:/tmp:/bin/sh
PASSWD
printf 'root:x:0:\nopencode:x:%s:\n' "$IMAGE_UID" >"$ROOT/etc/group"

old_id=$(podman image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
tar --numeric-owner --owner=0 --group=0 -C "$ROOT" -cf - . |
    podman import \
        --change 'ENTRYPOINT ["/bin/lovd-entrypoint"]' \
        --change 'CMD ["/bin/lovd-httpd"]' \
        --change "USER $IMAGE_UID:$IMAGE_UID" \
        --change 'WORKDIR /work' \
        --change 'EXPOSE 4096' \
        --change 'ENV PATH=/bin' \
        --change "LABEL lovd.image=test lovd.user=$IMAGE_UID lovd.port=4096" \
        --message "lovd test image" \
        --quiet - "$TAG" >/dev/null
finish_image "$TAG" "$old_id" "$start"
