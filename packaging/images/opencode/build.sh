#!/bin/bash
# Build lovd's OpenCode session image without a container registry.
#
#   packaging/images/opencode/build.sh [TAG]      (default localhost/lovd-session:latest)
#
# Run it as the user whose rootless Podman runs the sessions (lovd). It assembles a
# minimal root filesystem -- OpenCode's binary from the `opencode-ai` npm package, the
# host's node for the sequential-thinking MCP server, busybox for a shell, CA
# certificates, the config in config_opencode/ -- and imports it with `podman import`.
# Needs: podman, npm, node (/usr/bin/node), busybox-static; only the npm registry is
# contacted, and not at all when the package cache below is warm.
#
# Environment:
#   OPENCODE_VERSION       opencode-ai version (default 1.18.33)
#   SEQTHINK_VERSION       @modelcontextprotocol/server-sequential-thinking version (default 2026.8.31)
#   LOVD_IMAGE_CACHE       where installed npm packages are kept between builds
#                          (default ${XDG_CACHE_HOME:-$HOME/.cache}/lovd-image)
#   NODE_BIN, BUSYBOX_BIN  binaries to copy (default /usr/bin/node, /bin/busybox)
set -euo pipefail

TAG=${1:-localhost/lovd-session:latest}
OPENCODE_VERSION=${OPENCODE_VERSION:-1.18.33}
SEQTHINK_VERSION=${SEQTHINK_VERSION:-2026.8.31}
NODE_BIN=${NODE_BIN:-/usr/bin/node}
BUSYBOX_BIN=${BUSYBOX_BIN:-/bin/busybox}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
IMAGE_UID=1000
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../lib.sh
. "$HERE/../../lib.sh"
REPO=$(cd "$HERE/../../.." && pwd)
CACHE=${LOVD_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lovd-image}

die() { echo "build.sh: $*" >&2; exit 1; }
[ "$(id -u)" != 0 ] || die "run as the unprivileged user that runs the sessions (e.g. lovd), not root"
for tool in podman npm tar; do command -v "$tool" >/dev/null || die "$tool not found"; done
[ -x "$NODE_BIN" ] || die "node not found at $NODE_BIN (apt-get install nodejs)"
[ -x "$BUSYBOX_BIN" ] || die "busybox not found at $BUSYBOX_BIN (apt-get install busybox-static)"
file_info=$(LC_ALL=C od -An -c -N 4 "$BUSYBOX_BIN" | tr -d ' ')
[ "$file_info" = '177ELF' ] || die "$BUSYBOX_BIN is not an ELF binary"
[ -d "$REPO/config_opencode" ] || die "config_opencode/ not found under $REPO"

start=$(date +%s.%N)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lovd-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/rootfs

# --- npm packages (cached per version: a rebuild does not touch the network) ----------
case "$(uname -m)" in
    x86_64) arch=x64 ;;
    aarch64) arch=arm64 ;;
    *) die "unsupported architecture $(uname -m)" ;;
esac
variant=linux-$arch
# Bun's default x64 build needs AVX2; older CPUs need the "baseline" build.
if [ "$arch" = x64 ] && ! grep -qw avx2 /proc/cpuinfo; then variant=linux-x64-baseline; fi

PKGS=$CACHE/npm-opencode-$OPENCODE_VERSION-seqthink-$SEQTHINK_VERSION
OPENCODE_BIN=$PKGS/node_modules/opencode-$variant/bin/opencode
SEQ_DIR=$PKGS/node_modules/@modelcontextprotocol/server-sequential-thinking
if [ "$SEQTHINK_VERSION" = latest ] || [ ! -x "$OPENCODE_BIN" ] || [ ! -f "$SEQ_DIR/dist/index.js" ]; then
    # "latest" is re-resolved on each build; npm's own cache (~/.npm) keeps that cheap.
    mkdir -p "$PKGS"
    echo "installing opencode-ai@$OPENCODE_VERSION and server-sequential-thinking@$SEQTHINK_VERSION"
    npm install --prefix "$PKGS" --no-audit --no-fund --no-save --ignore-scripts \
        --loglevel=error --cache "$HOME/.npm" \
        "opencode-ai@$OPENCODE_VERSION" \
        "@modelcontextprotocol/server-sequential-thinking@$SEQTHINK_VERSION" >&2
fi
[ -x "$OPENCODE_BIN" ] || die "npm did not install opencode-$variant (got: $(ls "$PKGS/node_modules" | grep '^opencode' | tr '\n' ' '))"
[ -f "$SEQ_DIR/dist/index.js" ] || die "npm did not install server-sequential-thinking"

# --- root filesystem --------------------------------------------------------------------
mkdir -p "$ROOT"/{bin,usr/bin,etc/ssl/certs,opt/lovd/bin,opt/lovd/node_modules,work,tmp,run/secrets,proc,sys,dev,home,var/tmp}
chmod 1777 "$ROOT/tmp" "$ROOT/var/tmp"
# HOME is a link into the /tmp tmpfs because the container's root is read-only.
ln -s /tmp/home "$ROOT/home/opencode"

cp "$BUSYBOX_BIN" "$ROOT/bin/busybox"
for applet in sh ash cat cp env id ls mkdir rm sleep tr wget printf echo grep sed head ps kill; do
    ln -s busybox "$ROOT/bin/$applet"
done

cp "$OPENCODE_BIN" "$ROOT/opt/lovd/bin/opencode"
ln -s /opt/lovd/bin/opencode "$ROOT/usr/bin/opencode"
cp "$NODE_BIN" "$ROOT/usr/bin/node"

# Shared libraries of the dynamic binaries, at the paths the loader expects.
copy_libs() {
    ldd "$1" | awk '/=>/ {print $3} /^\t\/.*ld-linux/ {print $1}' | while read -r lib; do
        [ -n "$lib" ] && [ -e "$lib" ] || continue
        mkdir -p "$ROOT$(dirname "$lib")"
        [ -e "$ROOT$lib" ] || cp -L "$lib" "$ROOT$lib"
    done
}
copy_libs "$OPENCODE_BIN"
copy_libs "$NODE_BIN"
# OpenCode's grep/glob tools use ripgrep when present; otherwise they try to download it.
if command -v rg >/dev/null; then cp "$(command -v rg)" "$ROOT/usr/bin/rg"; copy_libs "$(command -v rg)"; fi

[ -f "$CA_BUNDLE" ] && cp -L "$CA_BUNDLE" "$ROOT/etc/ssl/certs/ca-certificates.crt"

# Only the sequential-thinking server and its dependencies, not the opencode binaries.
for entry in "$PKGS"/node_modules/* "$PKGS"/node_modules/.[!.]*; do
    [ -e "$entry" ] || continue
    case "$(basename "$entry")" in opencode-* | .bin | .package-lock.json) continue ;; esac
    cp -a "$entry" "$ROOT/opt/lovd/node_modules/"
done

cp -a "$REPO/config_opencode" "$ROOT/opt/lovd/config_opencode"
install -m 0755 "$HERE/lovd-entrypoint" "$ROOT/bin/lovd-entrypoint"

cat >"$ROOT/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/bin/sh
opencode:x:$IMAGE_UID:$IMAGE_UID:OpenCode session:/home/opencode:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$ROOT/etc/group" <<GROUP
root:x:0:
opencode:x:$IMAGE_UID:
nogroup:x:65534:
GROUP
echo "hosts: files dns" >"$ROOT/etc/nsswitch.conf"
printf '%s\n' "lovd OpenCode session image" "opencode-ai $OPENCODE_VERSION ($variant)" \
    "node $("$NODE_BIN" --version)" >"$ROOT/etc/lovd-image"

# --- import -----------------------------------------------------------------------------
old_id=$(podman image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
# Everything belongs to the container's root, so the session user (1000) cannot change
# the image even where the root filesystem is not mounted read-only. /work is chowned
# by Podman at run time (-v ...:/work:U).
tar --numeric-owner --owner=0 --group=0 -C "$ROOT" -cf - . |
    podman import \
        --change 'ENTRYPOINT ["/bin/lovd-entrypoint"]' \
        --change 'CMD ["opencode", "serve", "--hostname", "0.0.0.0", "--port", "4096"]' \
        --change "USER $IMAGE_UID:$IMAGE_UID" \
        --change 'WORKDIR /work' \
        --change 'EXPOSE 4096' \
        --change 'ENV PATH=/opt/lovd/bin:/usr/bin:/bin' \
        --change 'ENV HOME=/home/opencode' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV OPENCODE_CONFIG=/opt/lovd/config_opencode/opencode.jsonc' \
        `# No network at start: no models.dev fetch, no self-update, no per-session` \
        `# npm install of OpenCode's plugin package (npm_config_offline makes it fail fast),` \
        `# no project-level opencode.json from the workspace overriding lovd's config.` \
        --change 'ENV OPENCODE_DISABLE_MODELS_FETCH=1' \
        --change 'ENV OPENCODE_DISABLE_AUTOUPDATE=1' \
        --change 'ENV OPENCODE_DISABLE_SHARE=1' \
        --change 'ENV OPENCODE_DISABLE_LSP_DOWNLOAD=1' \
        --change 'ENV OPENCODE_DISABLE_CLAUDE_CODE=1' \
        --change 'ENV OPENCODE_DISABLE_PROJECT_CONFIG=1' \
        --change 'ENV npm_config_offline=true' \
        --change "LABEL lovd.image=session lovd.user=$IMAGE_UID lovd.port=4096 lovd.opencode.version=$OPENCODE_VERSION" \
        --message "lovd session image, opencode-ai $OPENCODE_VERSION" \
        --quiet - "$TAG" >/dev/null

finish_image "$TAG" "$old_id" "$start"
