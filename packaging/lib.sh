# Shell helpers shared by lovd's packaging scripts (sourced, not run).

# ensure_packages PKG...: apt-get install the ones that are missing (one apt run).
ensure_packages() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    printf '==> installing packages: %s\n' "${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
}

# finish_image TAG OLD_ID START: drop the image the build replaced (unless a container
# still uses it) and report build time and size.
finish_image() {
  local tag=$1 old_id=$2 start=$3 new_id end size
  new_id=$(podman image inspect --format '{{.Id}}' "$tag")
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    podman rmi "$old_id" >/dev/null 2>&1 || true
  fi
  end=$(date +%s.%N)
  size=$(podman image inspect --format '{{.Size}}' "$tag")
  awk -v tag="$tag" -v id="${new_id:0:12}" -v s="$start" -v e="$end" -v size="$size" \
    'BEGIN { printf "built %s (%s) in %.1f s; image size %d bytes (%.1f MB)\n", tag, id, e - s, size, size / 1e6 }'
}
