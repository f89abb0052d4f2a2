#!/usr/bin/env bash
# Build the Containerfile with no container registry, and check the image.
#
#   scripts/container_build.sh            # from anywhere; must run as root (debootstrap, rootful podman)
#
# 1. Base image: a Debian bookworm minbase rootfs (python3 3.11 + python3-venv) made with debootstrap
#    from the apt mirror, imported as $BASE_IMAGE. The rootfs tarball is cached in
#    .cache/container-base/ (gitignored); the image is reused while its cache key label matches.
# 2. podman build --format docker (the OCI format drops HEALTHCHECK). RUN isolation is probed: the
#    default OCI runtime, else --isolation chroot (crun refuses hybrid cgroup v1/v2 hosts).
#    The host CA bundle is bind-mounted for the build only (TLS-intercepting egress), never baked in.
# 3. podman image inspect: User, ExposedPorts, Healthcheck, Entrypoint, Cmd, size.
# 4. If some `podman run` variant works here: --help, demo mode (healthz, a streamed completion,
#    the HEALTHCHECK command, uid, SIGTERM stop), and the default CMD with a mounted config.
#
# Environment: IMAGE (llm-gateway:test), BASE_IMAGE (localhost/python:3.11-local), MIRROR,
# SECURITY_MIRROR, HOST_CA_BUNDLE ("" to disable), HOST_PORT (18080), REQUIRE_RUN=1 (fail when no
# run variant works), KEEP_IMAGE=0 (remove $IMAGE at the end).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

IMAGE=${IMAGE:-llm-gateway:test}
BASE_IMAGE=${BASE_IMAGE:-localhost/python:3.11-local}
SUITE=bookworm                       # bookworm's python3 is 3.11, like python:3.11-slim (also bookworm)
BASE_PACKAGES=python3,python3-venv,ca-certificates
CACHE_DIR=$ROOT/.cache/container-base
HOST_CA_BUNDLE=${HOST_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
HOST_PORT=${HOST_PORT:-18080}
REQUIRE_RUN=${REQUIRE_RUN:-0}
KEEP_IMAGE=${KEEP_IMAGE:-1}

say() { printf '==> %s\n' "$*"; }
ok() { printf '    OK   %s\n' "$*"; }
bad() { printf '    FAIL %s\n' "$*"; FAILED=1; }
FAILED=0
SUMMARY=()
now() { date +%s; }

[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap/chroot and rootful podman)" >&2; exit 1; }
command -v podman >/dev/null || { echo "podman not installed" >&2; exit 1; }
say "podman $(podman --version | awk '{print $3}'), $(date -u +%FT%TZ)"

# ---------------------------------------------------------------------------------------------------
# 1. Base image
# ---------------------------------------------------------------------------------------------------
# The first Debian (non-security) mirror in the apt sources, deb822 or one-line format.
apt_mirror() {
  local want=$1   # debian | debian-security
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    grep -v '^\s*#' | grep -oE '(https?|file)://[^ ]+' | sed 's:/*$::' |
    if [ "$want" = debian ]; then grep -E '/debian$'; else grep -E '/debian-security$'; fi | head -1 || true
}
MIRROR=${MIRROR:-$(apt_mirror debian)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-$(apt_mirror debian-security)}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}

CACHE_KEY=$(printf '%s|%s|minbase|v1' "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
TARBALL=$CACHE_DIR/$SUITE-minbase-$CACHE_KEY.tar.gz
ROOTFS=$CACHE_DIR/rootfs.tmp

cleanup_rootfs() {
  if [ -d "$ROOTFS" ]; then
    for m in proc sys dev/pts dev; do umount "$ROOTFS/$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$ROOTFS"
  fi
}

make_tarball() {
  command -v debootstrap >/dev/null || {
    say "installing debootstrap (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
  }
  mkdir -p "$CACHE_DIR"
  cleanup_rootfs
  trap cleanup_rootfs EXIT
  say "debootstrap --variant=minbase $SUITE from $MIRROR (+ $BASE_PACKAGES)"
  local t0; t0=$(now)
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" \
    > "$CACHE_DIR/debootstrap.log" 2>&1 || { tail -20 "$CACHE_DIR/debootstrap.log" >&2; exit 1; }
  # Security and point-release updates, as the official python:3.11-slim carries them.
  cat > "$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
  say "apt-get upgrade inside the rootfs ($SUITE-updates, $SUITE-security)"
  mount -t proc proc "$ROOTFS/proc"
  chroot "$ROOTFS" sh -c 'DEBIAN_FRONTEND=noninteractive apt-get -q update && DEBIAN_FRONTEND=noninteractive apt-get -q -y upgrade' \
    >> "$CACHE_DIR/debootstrap.log" 2>&1 || { umount "$ROOTFS/proc"; tail -20 "$CACHE_DIR/debootstrap.log" >&2; exit 1; }
  umount "$ROOTFS/proc"
  chroot "$ROOTFS" apt-get clean
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/log/apt/* \
         "$ROOTFS"/tmp/* "$ROOTFS"/root/.cache
  : > "$ROOTFS/etc/resolv.conf"     # podman supplies its own at run time
  echo "$SUITE-minbase-$CACHE_KEY" > "$ROOTFS/etc/container-base-key"
  tar --numeric-owner -C "$ROOTFS" -czf "$TARBALL.part" . && mv "$TARBALL.part" "$TARBALL"
  cleanup_rootfs
  trap - EXIT
  # Older tarballs (other cache keys) are dead weight.
  find "$CACHE_DIR" -maxdepth 1 -name "$SUITE-minbase-*.tar.gz" ! -name "$(basename "$TARBALL")" -delete
  SUMMARY+=("base rootfs: debootstrap + upgrade $(( $(now) - t0 ))s, tarball $(du -h "$TARBALL" | cut -f1)")
}

have_base=0
if podman image exists "$BASE_IMAGE"; then
  label=$(podman image inspect "$BASE_IMAGE" --format '{{index .Labels "local.container-base.key"}}' 2>/dev/null || true)
  [ "$label" = "$CACHE_KEY" ] && have_base=1
fi
if [ "$have_base" = 1 ]; then
  say "base image $BASE_IMAGE present (cache key $CACHE_KEY)"
  SUMMARY+=("base image: reused $BASE_IMAGE")
else
  if [ -s "$TARBALL" ]; then say "using cached rootfs $TARBALL"; else make_tarball; fi
  say "podman import -> $BASE_IMAGE"
  t0=$(now)
  podman import -q \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change "LABEL local.container-base.key=$CACHE_KEY" \
    "$TARBALL" "$BASE_IMAGE" >/dev/null
  SUMMARY+=("base image: imported $BASE_IMAGE in $(( $(now) - t0 ))s")
fi
say "base: $BASE_IMAGE ($(podman image inspect "$BASE_IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}'), key $CACHE_KEY)"

# ---------------------------------------------------------------------------------------------------
# 2. Build
# ---------------------------------------------------------------------------------------------------
# Can RUN steps use the default OCI runtime here? Probe with a throwaway one-step build.
ISOLATION=${BUILD_ISOLATION:-}
if [ -z "$ISOLATION" ]; then
  probe_dir=$(mktemp -d)
  printf 'FROM %s\nRUN true\n' "$BASE_IMAGE" > "$probe_dir/Containerfile"
  if podman build -q --no-cache --iidfile "$probe_dir/iid" "$probe_dir" >"$probe_dir/log" 2>&1; then
    ISOLATION=oci
  else
    ISOLATION=chroot
    say "RUN with the default OCI runtime fails here, using --isolation chroot. Probe error:"
    grep -m1 -E 'crun|runc|rror' "$probe_dir/log" | cut -c1-200 | sed 's/^/      /' || true
  fi
  [ -s "$probe_dir/iid" ] && podman rmi -f "$(cat "$probe_dir/iid")" >/dev/null 2>&1 || true
  rm -rf "$probe_dir"
fi
BUILD_ARGS=(--format docker --isolation "$ISOLATION" --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE")
if [ -n "$HOST_CA_BUNDLE" ] && [ -s "$HOST_CA_BUNDLE" ]; then
  # Debian's pip (the venv's) trusts /etc/ssl/certs/ca-certificates.crt: lend it the host's for the
  # build so a TLS-intercepting egress proxy works. A build-time mount: not part of the image.
  BUILD_ARGS+=(-v "$HOST_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
fi
old_id=$(podman image inspect "$IMAGE" --format '{{.Id}}' 2>/dev/null || true)
say "podman build ${BUILD_ARGS[*]} ."
t0=$(now)
mkdir -p "$CACHE_DIR"
if ! podman build "${BUILD_ARGS[@]}" . > "$CACHE_DIR/build.log" 2>&1; then
  tail -30 "$CACHE_DIR/build.log"
  echo "BUILD FAILED (full log: $CACHE_DIR/build.log)" >&2
  exit 1
fi
BUILD_S=$(( $(now) - t0 ))
grep -iE 'level=warning' "$CACHE_DIR/build.log" | sed 's/^/    build warning: /' || true
new_id=$(podman image inspect "$IMAGE" --format '{{.Id}}')
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  podman rmi "$old_id" >/dev/null 2>&1 || true     # the previous build, now untagged
fi
SUMMARY+=("build: ${BUILD_S}s, isolation=$ISOLATION, image $IMAGE ${new_id:0:12}")

# ---------------------------------------------------------------------------------------------------
# 3. Image metadata
# ---------------------------------------------------------------------------------------------------
say "podman image inspect $IMAGE"
podman image inspect "$IMAGE" | python3 -c '
import json, sys
d = json.load(sys.stdin)[0]
c = d.get("Config") or {}
hc = d.get("Healthcheck") or c.get("Healthcheck") or {}
checks = [
    ("User", c.get("User"), c.get("User") == "gateway"),
    ("ExposedPorts", sorted(c.get("ExposedPorts") or {}), "8080/tcp" in (c.get("ExposedPorts") or {})),
    ("Healthcheck", " ".join(hc.get("Test") or [])[:80] + "...",
        "/healthz" in " ".join(hc.get("Test") or [])),
    ("Healthcheck timing", {k: hc.get(k) for k in ("Interval", "Timeout", "StartPeriod", "Retries")},
        bool(hc.get("Interval"))),
    ("Entrypoint", c.get("Entrypoint"), c.get("Entrypoint") == ["python", "-m", "proxy"]),
    ("Cmd", c.get("Cmd"), c.get("Cmd") == ["serve", "--config", "/etc/llm-gateway/gateway.toml"]),
    ("WorkingDir", c.get("WorkingDir"), c.get("WorkingDir") == "/app"),
    ("PATH has /opt/venv/bin", [e for e in c.get("Env", []) if e.startswith("PATH=")],
        any(e.startswith("PATH=/opt/venv/bin:") for e in c.get("Env", []))),
    ("ManifestType", d.get("ManifestType"), "docker" in (d.get("ManifestType") or "")),
]
bad = 0
for name, value, good in checks:
    mark = "OK  " if good else "FAIL"
    print(f"    {mark} {name}: {value}")
    bad += not good
size, layers = d["Size"] / 1e6, len(d["RootFS"]["Layers"])
print(f"    size: {size:.0f} MB ({layers} layers)")
sys.exit(1 if bad else 0)
' || FAILED=1
SIZE_MB=$(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f", $1/1e6}')
SUMMARY+=("image size: ${SIZE_MB} MB")

# ---------------------------------------------------------------------------------------------------
# 4. Run (if any variant of `podman run` works on this host)
# ---------------------------------------------------------------------------------------------------
# Sandboxes without CAP_SYS_RESOURCE fail podman's default rlimits (setrlimit RLIMIT_NOFILE/NPROC:
# Operation not permitted); crun 1.8 refuses hybrid cgroup v1/v2 hosts, runc does not.
LIMITS="--ulimit nofile=4096:4096 --ulimit nproc=4096:4096"
CANDIDATES=("" "$LIMITS")
command -v runc >/dev/null && CANDIDATES+=("--runtime runc" "--runtime runc $LIMITS")
RUN_OPTS=
RUN_OK=0
say "probing podman run ($IMAGE --help)"
for opts in "${CANDIDATES[@]}"; do
  # shellcheck disable=SC2086
  if out=$(timeout 60 podman run --rm --no-healthcheck $opts "$IMAGE" --help 2>&1); then
    RUN_OPTS=$opts; RUN_OK=1
    ok "podman run ${opts:-(defaults)} ... --help: $(echo "$out" | grep -m1 usage:)"
    break
  else
    echo "    no   podman run ${opts:-(defaults)}: $(echo "$out" | grep -E '^Error' | tail -1)"
  fi
done

http() {  # http METHOD URL [BODY] -> prints "status body"
  python3 - "$@" <<'EOF'
import sys, urllib.request
method, url = sys.argv[1], sys.argv[2]
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.status, r.read().decode(errors="replace").replace("\n", " ")[:300])
except Exception as e:
    print("ERR", e)
EOF
}
wait_healthz() {
  for _ in $(seq 1 40); do
    [ "$(http GET "http://127.0.0.1:$HOST_PORT/healthz" | cut -d' ' -f1)" = 200 ] && return 0
    sleep 0.25
  done
  return 1
}
NAMES=(gwtest-main gwtest-fake gwtest-demo)
rm_containers() { for n in "${NAMES[@]}"; do podman rm -f -t 0 "$n" >/dev/null 2>&1 || true; done; }

if [ "$RUN_OK" = 1 ]; then
  trap rm_containers EXIT
  rm_containers
  # podman's healthcheck timers need systemd; `podman healthcheck run` below runs the same command.
  hc_noise='systemd connection|/run/systemd/private'
  # --- demo mode: no config, built-in fake provider
  say "demo: podman run -d $RUN_OPTS -p 127.0.0.1:$HOST_PORT:8080 $IMAGE serve --demo --host 0.0.0.0"
  # shellcheck disable=SC2086
  podman run -d $RUN_OPTS --name gwtest-demo -p "127.0.0.1:$HOST_PORT:8080" "$IMAGE" serve --demo --host 0.0.0.0 \
    2>&1 >/dev/null | grep -vE "$hc_noise" || true
  if wait_healthz; then
    ok "GET /healthz: $(http GET "http://127.0.0.1:$HOST_PORT/healthz")"
    r=$(http POST "http://127.0.0.1:$HOST_PORT/v1/chat/completions" \
        '{"model": "demo", "stream": true, "messages": [{"role": "user", "content": "Hello"}]}')
    if [[ $r == 200* && $r == *"data: "* ]]; then ok "streamed chat completion: ${r:0:120}..."; else bad "streamed chat completion: $r"; fi
    if podman healthcheck run gwtest-demo >/dev/null 2>&1; then
      ok "HEALTHCHECK command (podman healthcheck run): $(podman inspect gwtest-demo --format '{{.State.Health.Status}}')"
    else bad "HEALTHCHECK command failed"; fi
    uid=$(podman exec gwtest-demo sh -c 'echo "$(id -un)-$(id -u)"' 2>/dev/null || true)
    [ "$uid" = gateway-10001 ] && ok "process user: $uid" || bad "process user: $uid"
    py=$(podman exec gwtest-demo python -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>&1 || true)
    ok "python in container: $py"
    t0=$(date +%s%N)
    podman stop -t 10 gwtest-demo >/dev/null 2>&1 || true
    dt=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN {printf "%.2f", (b - a) / 1e9}')
    code=$(podman inspect gwtest-demo --format '{{.State.ExitCode}}')
    [ "$code" = 0 ] && ok "podman stop (SIGTERM): exit $code in ${dt}s" || bad "podman stop: exit $code in ${dt}s"
  else
    bad "demo /healthz never answered; logs:"; podman logs gwtest-demo 2>&1 | tail -10
  fi
  podman rm -f -t 0 gwtest-demo >/dev/null 2>&1 || true

  # --- default CMD: serve --config /etc/llm-gateway/gateway.toml
  # shellcheck disable=SC2086
  out=$(podman run --rm --no-healthcheck $RUN_OPTS "$IMAGE" 2>&1 | grep -vE "$hc_noise" || true)
  [[ $out == *"/etc/llm-gateway/gateway.toml"* ]] && ok "default CMD without a mounted config fails cleanly: $out" \
    || bad "default CMD without config: $out"
  cfg_dir=$(mktemp -d)
  cat > "$cfg_dir/gateway.toml" <<'EOF'
[server]
host = "0.0.0.0"
port = 8080

[providers.fake]
kind = "openai"
base_url = "http://127.0.0.1:9000/v1"

[models."*"]
deployments = [{ provider = "fake" }]
EOF
  chmod 644 "$cfg_dir/gateway.toml"
  say "config: fake provider + gateway (default CMD, -v gateway.toml:/etc/llm-gateway/gateway.toml:ro), shared netns"
  # shellcheck disable=SC2086
  podman run -d $RUN_OPTS --no-healthcheck --name gwtest-fake -p "127.0.0.1:$HOST_PORT:8080" "$IMAGE" \
    fake-provider --port 9000 >/dev/null
  # shellcheck disable=SC2086
  podman run -d $RUN_OPTS --name gwtest-main --network container:gwtest-fake \
    -v "$cfg_dir/gateway.toml:/etc/llm-gateway/gateway.toml:ro" "$IMAGE" 2>&1 >/dev/null | grep -vE "$hc_noise" || true
  if wait_healthz; then
    r=$(http POST "http://127.0.0.1:$HOST_PORT/v1/chat/completions" '{"model": "gpt-x", "messages": [{"role": "user", "content": "Hello"}]}')
    [[ $r == 200* ]] && ok "mounted config, non-streamed completion: ${r:0:120}..." || bad "mounted config completion: $r"
    podman healthcheck run gwtest-main >/dev/null 2>&1 && ok "HEALTHCHECK command on the configured gateway" \
      || bad "HEALTHCHECK on the configured gateway"
  else
    bad "configured gateway /healthz never answered; logs:"; podman logs gwtest-main 2>&1 | tail -10
  fi
  rm_containers
  rm -rf "$cfg_dir"
  trap - EXIT
  SUMMARY+=("run: works with: podman run ${RUN_OPTS:-(defaults)}")
else
  SUMMARY+=("run: NOT VERIFIED - no podman run variant works on this host (errors above)")
  [ "$REQUIRE_RUN" = 1 ] && FAILED=1
fi

[ "$KEEP_IMAGE" = 1 ] || podman rmi "$IMAGE" >/dev/null

say "summary"
for s in "${SUMMARY[@]}"; do echo "    $s"; done
if [ "$FAILED" = 0 ]; then say "ALL CHECKS PASSED"; else say "SOME CHECKS FAILED"; exit 1; fi
