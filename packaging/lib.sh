# Shell helpers shared by lovd's packaging scripts (sourced, not run).
# shellcheck shell=bash

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

# ---------------------------------------------------------------------------------------
# Root and the paths the lovd user controls.
#
# The lovd user -- and so the daemon, or a session that escapes into it -- owns its
# home/state directory and everything below it (.config, sessions/, ...). Any name there
# can be swapped for a symbolic link, or a hard link, at any moment; a root script that
# writes, creates, chowns or chmods such a path can be steered into /etc/shadow. A check
# like [ -L ] followed by the act is a race, not a defence. So root never acts on a path
# below a directory another user controls: it asks that user to do it (owner_* below, run
# through runuser), and then a planted link reaches only what the user could reach anyway.
# The one thing only root can do, creating the user's directory itself, is done by
# owned_dir, which first proves that nobody but root can change any directory above it.

# as_owner USER CMD...: run CMD as USER, from / (a working directory root chose is no
# business of USER's, and it may not even be able to enter it).
as_owner() {
  local user=$1
  shift
  runuser -u "$user" -- env -C / "$@"
}

# owner_mkdir USER MODE DIR...: as USER, create each DIR (with parents) and give it MODE.
# A DIR that is a symbolic link is refused rather than followed: the link may point into
# another user's tree, and the message says what to clean up.
owner_mkdir() {
  local user=$1 mode=$2
  shift 2
  # shellcheck disable=SC2016 # expanded by the inner shell, as the user
  as_owner "$user" sh -c '
    mode=$1; shift
    for d in "$@"; do
      if [ -L "$d" ]; then
        echo "refusing: $d is a symbolic link (remove it; it must be a directory of $(id -un))" >&2
        exit 1
      fi
      mkdir -p -- "$d" && chmod -- "$mode" "$d" || exit 1
    done' owner_mkdir "$mode" "$@"
}

# owner_write USER MODE DEST: as USER, replace DEST with standard input. A new file is
# renamed over DEST, so a link planted at DEST is replaced, never written through.
owner_write() {
  # shellcheck disable=SC2016 # expanded by the inner shell, as the user
  as_owner "$1" sh -c '
    set -e
    mode=$1 dest=$2
    tmp=$(mktemp -- "$dest.XXXXXX")
    trap "rm -f -- \"\$tmp\"" EXIT
    cat > "$tmp"
    chmod -- "$mode" "$tmp"
    mv -fT -- "$tmp" "$dest"
    trap - EXIT' owner_write "$2" "$3"
}

# owner_same USER FILE DEST: whether DEST, read as USER, has the content of FILE (which
# root opens: it may be root's own temporary file).
owner_same() {
  as_owner "$1" cmp -s - "$3" < "$2"
}

# root_only_parents DIR: succeed, and print DIR with the links above it resolved, if every
# directory above DIR is a real directory owned by root and writable by nobody else (then
# no other user can put anything in DIR's place), and DIR itself, if it exists, is a
# directory and not a link. The path is walked one name at a time, as the kernel would:
# a symbolic link on the way is followed only if it sits in a directory already proven
# root's alone (so root made it), and its target is walked the same way.
root_only_parents() {
  local dir=$1 name cur=/ next target hops=0 i=0 parts rest
  case $dir in /?*) ;; *) echo "refusing: $dir is not an absolute path" >&2; return 1 ;; esac
  name=${dir##*/}
  case $name in "" | . | ..) echo "refusing: $dir does not end in a directory name" >&2; return 1 ;; esac
  _root_alone / "$dir" || return 1
  IFS=/ read -r -a parts <<< "${dir%/*}"
  while [ "$i" -lt "${#parts[@]}" ]; do
    next=${parts[i]}
    i=$((i + 1))
    case $next in
      "" | .) continue ;;
      ..) cur=$(dirname -- "$cur"); continue ;;  # cur holds no links: its parent is real
    esac
    next=${cur%/}/$next
    if [ -L "$next" ]; then
      hops=$((hops + 1))
      if [ "$hops" -gt 40 ]; then echo "refusing: too many links in $dir" >&2; return 1; fi
      target=$(readlink -- "$next") || return 1
      case $target in /*) cur=/ ;; esac
      IFS=/ read -r -a rest <<< "$target"
      parts=("${rest[@]}" "${parts[@]:i}")
      i=0
      continue
    fi
    _root_alone "$next" "$dir" || return 1
    cur=$next
  done
  next=${cur%/}/$name
  if [ -L "$next" ] || { [ -e "$next" ] && [ ! -d "$next" ]; }; then
    echo "refusing: $dir exists and is not a directory (a link?)" >&2
    return 1
  fi
  printf '%s\n' "$next"
}

# _root_alone PATH DIR: PATH is a real directory owned by root, writable by root only.
_root_alone() {
  local owner mode kind
  read -r owner mode kind < <(stat -c '%u %a %F' -- "$1") || true
  # %a is octal; 022 = writable by group or others (the sticky /tmp included).
  if [ "$owner" != 0 ] || [ "$kind" != directory ] || (( 8#${mode:-0} & 8#022 )); then
    echo "refusing: $1 (above $2) is not a directory of root's alone (owner uid ${owner:-?}, mode ${mode:-?}, ${kind:-missing}); another user could put a link in place of $2" >&2
    return 1
  fi
}

# owned_dir USER GROUP MODE DIR: create DIR (its parent must exist) or take an existing
# one, owned by USER:GROUP with MODE -- only where root_only_parents vouches for it.
owned_dir() {
  local user=$1 group=$2 mode=$3 dir
  dir=$(root_only_parents "$4") || return 1
  [ -d "$dir" ] || mkdir -m 0700 -- "$dir"
  chown -h -- "$user:$group" "$dir"
  chmod -- "$mode" "$dir"
}

# reachable_by_others DIR SCRIPT: exit with a fix when the lovd user cannot reach DIR
# (lovd runs from the checkout as that user; a clone in root's 0700 home would fail
# much later with "Permission denied").
reachable_by_others() {
  local d=$1
  while [ "$d" != / ]; do
    if [ "$(( 0$(stat -c %a "$d") & 01 ))" -eq 0 ]; then
      echo "$2: the lovd user cannot reach $1 ($d is mode $(stat -c %a "$d")):" \
        "clone lovd to a directory others may read (e.g. /opt/lovd-src or /srv/lovd)," \
        "or chmod o+x $d" >&2
      exit 2
    fi
    d=$(dirname "$d")
  done
}

# ---------------------------------------------------------------------------------------
# The lovd user's rootless Podman configuration.

# podman_user_config USER DIR: write USER's containers.conf and storage.conf in DIR (as
# USER, lib.sh's owner_write), each only when its content differs, and set
# PODMAN_CONFIG_CHANGED=1 when one was written. setup-host.sh and install.sh both write
# them from here, so running one after the other changes nothing. The caller runs
# `podman system migrate` only after a change: migrate restarts Podman's pause process,
# and with it every running container of USER (every session).
podman_user_config() {
  local user=$1 dir=$2 runtime=runc cgroup_manager=cgroupfs tmp
  # crun refuses hybrid cgroups; the runtime is chosen by what works on this host.
  if [ -f /sys/fs/cgroup/cgroup.controllers ] && command -v crun >/dev/null; then runtime=crun; fi
  tmp=$(mktemp)
  if [ -d /run/systemd/system ] && [ "$(ps -p 1 -o comm=)" = systemd ]; then
    # Rootless Podman cannot use cgroups at all on cgroup v1; the systemd manager then
    # only adds scope round trips, and cgroupfs is what Podman itself falls back to.
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then cgroup_manager=systemd; fi
    cat > "$tmp" <<CONF
# Written by lovd's packaging scripts (setup-host.sh, install.sh).
[containers]
# Rootless processes may not raise limits above the user's hard limits.
default_ulimits = ["nofile=8192:8192", "nproc=32768:32768"]
# Container stdout/stderr go to the journal, tagged with the session unit.
log_driver = "journald"
[engine]
runtime = "$runtime"
cgroup_manager = "$cgroup_manager"
events_logger = "journald"
CONF
  else
    cat > "$tmp" <<CONF
# Written by lovd's setup-host.sh.
[containers]
# Rootless processes may not raise limits above the hard limit of the user.
default_ulimits = ["nofile=8192:8192", "nproc=32768:32768"]
[engine]
runtime = "$runtime"
cgroup_manager = "$cgroup_manager"
events_logger = "file"
CONF
  fi
  _config_update "$user" "$tmp" "$dir/containers.conf"
  if [ -d /run/systemd/system ] && [ "$(ps -p 1 -o comm=)" = systemd ]; then
    printf '%s\n' "# Written by lovd's packaging scripts: native rootless overlay instead of the vfs" > "$tmp"
  else
    printf '%s\n' "# Written by lovd's setup-host.sh: native rootless overlay instead of the vfs" > "$tmp"
  fi
  cat >> "$tmp" <<CONF
# fallback (which copies every image per container).
[storage]
driver = "overlay"
CONF
  _config_update "$user" "$tmp" "$dir/storage.conf"
  rm -f -- "$tmp"
}

# _config_update USER SRC DEST: write DEST as USER (0644) when it differs from SRC.
_config_update() {
  if ! owner_same "$1" "$2" "$3"; then
    owner_write "$1" 0644 "$3" < "$2"
    PODMAN_CONFIG_CHANGED=1
  fi
}
