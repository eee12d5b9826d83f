#!/usr/bin/env bash
# `make docker-test`: the image (Dockerfile) and deploy/compose.yaml in a real Docker engine.
#
# Installs the engine (Debian's docker.io), debootstrap and Compose when missing, starts dockerd
# when none runs (and stops only the one it started), makes a local base image with debootstrap
# (Docker Hub is not needed; cached as $BASE_IMAGE), builds wheels on the host and the image
# from them with --network=none, then runs the app + sidecar pair of deploy/compose.yaml exactly
# as README "Running as a sidecar" says, and checks it.
#
# Traffic stays on loopback: dockerd runs with --bridge=none --iptables=false, containers use
# --network=host with 127.0.0.1 ports (or a network namespace of their own: --network=none).
#
# DOCKER_TEST_SKIP_OK=1 (what `make test` sets): where the engine cannot be installed or started,
# print `SKIP docker-test: <reason>` and exit 0 instead of failing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

PY=${PYTHON:-.venv/bin/python}
BASE_IMAGE=${BASE_IMAGE:-failproxy-base:bookworm}
IMAGE=failproxy:docker-test
PROJECT=fpdt
SOLO=fpdt-solo
T0=$SECONDS
WORK=$(mktemp -d /tmp/fpdt.XXXXXX)
DOCKERD_PID=""
PEER_PID=""
COMPOSE=()

log() { printf '[docker-test %3ds] %s\n' $((SECONDS - T0)) "$*"; }
skip() {
    if [ "${DOCKER_TEST_SKIP_OK:-0}" = 1 ]; then echo "SKIP docker-test: $*"; exit 0; fi
    echo "docker-test: cannot run: $*" >&2
    exit 1
}
dump() {
    for c in "${PROJECT}_failproxy_1" "${PROJECT}_app_1" "${PROJECT}-failproxy-1" \
             "${PROJECT}-app-1" "$SOLO" "$SOLO-app"; do
        docker inspect "$c" >/dev/null 2>&1 || continue
        echo "--- docker logs $c (last 20 lines)"; docker logs --tail 20 "$c" 2>&1 || true
    done
    [ -s "$WORK/dockerd.log" ] && { echo "--- dockerd log (last 20 lines)"; tail -20 "$WORK/dockerd.log"; }
    return 0
}
fail() { echo "FAIL docker-test: $*" >&2; dump >&2; exit 1; }
compose() { "${COMPOSE[@]}" -f deploy/compose.yaml -p "$PROJECT" "$@"; }

cleanup() {
    set +e
    if [ ${#COMPOSE[@]} -gt 0 ] && docker info >/dev/null 2>&1; then
        compose down -v --remove-orphans >/dev/null 2>&1
        docker rm -f -v "$SOLO-client" "$SOLO-app" "$SOLO" >/dev/null 2>&1
    fi
    [ -n "$PEER_PID" ] && kill "$PEER_PID" 2>/dev/null
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
        log "stopped the dockerd this test started (pid $DOCKERD_PID)"
    fi
    rm -rf "$WORK"
}

# One run at a time on a machine: another worktree's run may share the dockerd started here.
lock=/tmp/failproxy-docker-test.lock
if { exec 9>>"$lock"; } 2>/dev/null; then chmod 666 "$lock" 2>/dev/null || true; else exec 9</dev/null; fi
flock -w 900 9 || fail "another docker-test kept $lock for 15 minutes"
trap cleanup EXIT

# ---- 1. the engine, debootstrap, Compose ------------------------------------------------------
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
    || missing+=(debootstrap)
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then COMPOSE=(docker-compose)
else missing+=(docker-compose); fi
if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    command -v apt-get >/dev/null 2>&1 || skip "no apt-get to install ${missing[*]}"
    [ "$(id -u)" = 0 ] || skip "not root: cannot install ${missing[*]} nor run dockerd"
    log "installing ${missing[*]}"
    # Installing must not start a dockerd with its default bridge network: no services now.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"
    fi
    ok=1
    env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$WORK/apt.log" 2>&1 \
        && env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >>"$WORK/apt.log" 2>&1 || ok=0
    [ -n "$policy" ] && rm -f "$policy"
    [ "$ok" = 1 ] || skip "apt-get install ${missing[*]} failed: $(tail -3 "$WORK/apt.log" | tr '\n' ' ')"
    if [ ${#COMPOSE[@]} -eq 0 ]; then
        if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
    fi
fi
log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version 2>/dev/null | head -1))"

# ---- 2. a running dockerd ---------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || skip "no dockerd runs and only root may start one"
    dockerd --bridge=none --iptables=false --ip6tables=false >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 150); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.2
    done
    if ! docker info >/dev/null 2>&1; then
        reason=$(tail -3 "$WORK/dockerd.log" | tr '\n' ' ')
        kill "$DOCKERD_PID" 2>/dev/null; DOCKERD_PID=""
        skip "dockerd did not start: $reason"
    fi
    log "started dockerd --bridge=none --iptables=false (pid $DOCKERD_PID)"
else
    log "using the dockerd that runs ($(docker info -f '{{.ServerVersion}}'))"
fi
# leftovers of an interrupted run
compose down -v --remove-orphans >/dev/null 2>&1 || true
docker rm -f -v "$SOLO-client" "$SOLO-app" "$SOLO" >/dev/null 2>&1 || true

# ---- 3. the local base image: debootstrap from the host's own Debian mirror --------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE: cached"
else
    mirror=$(python3 - <<'EOF'
import glob, re
found = []
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        f = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
        if "deb" in f.get("Types", "").split() and "bookworm" in f.get("Suites", "").split():
            found += f.get("URIs", "").split()
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line)
        if m:
            found.append(m.group(1))
print(found[0] if found else "http://deb.debian.org/debian")
EOF
)
    rootfs="$WORK/rootfs"
    log "debootstrap --variant=minbase --include=python3,python3-venv bookworm from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$mirror" \
        >"$WORK/debootstrap.log" 2>&1 || fail "debootstrap: $(tail -5 "$WORK/debootstrap.log")"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
        "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "base image $BASE_IMAGE: made ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
fi

# ---- 4. wheels on the host, the image offline (README "Running as a sidecar") ----------------
# `pip wheel . -w wheelhouse`; the dependencies' wheels are fetched again only when
# pyproject.toml changes (the stamp), failproxy's own on every run.
stamp="wheelhouse/.deps-$(sha1sum pyproject.toml | cut -c1-12)"
deps=(); [ -e "$stamp" ] && deps=(--no-deps)
# failproxy's own wheel of an earlier run (compiled, or pure where no compiler was) must not be
# the one the image installs
rm -f wheelhouse/failproxy-*.whl
"$PY" -m pip wheel --quiet --disable-pip-version-check "${deps[@]}" . -w wheelhouse \
    >"$WORK/wheel.log" 2>&1 || fail "pip wheel: $(grep -v 'is ignored' "$WORK/wheel.log" | tail -5)"
rm -f wheelhouse/.deps-*; touch "$stamp"
wheel=$(cd wheelhouse && ls failproxy-*.whl)
log "wheelhouse: $(ls wheelhouse/*.whl | wc -l) wheels, failproxy's $wheel"
# A host without a C compiler builds the pure-Python wheel; the image then says so on purpose.
# Anywhere else the image must run the compiled build (the Dockerfile's default, BUILD=compiled).
case "$wheel" in
    *-py3-none-any.whl) BUILD=pure; log "no compiled wheel on this host: building with BUILD=pure" ;;
    *) BUILD=compiled ;;
esac
docker build --network=none --build-arg BASE="$BASE_IMAGE" --build-arg BUILD="$BUILD" \
    -t "$IMAGE" . >"$WORK/build.log" 2>&1 || fail "docker build: $(tail -15 "$WORK/build.log")"
built=$(docker run --rm --network=none "$IMAGE" --version)
case "$BUILD:$built" in
    "compiled:failproxy "*" (compiled with mypyc and Cython)"|"pure:failproxy "*" (pure Python"*) ;;
    *) fail "the image runs '$built' (BUILD=$BUILD)" ;;
esac
log "ok: the image runs $built"
docker image prune -f --filter label=failproxy.stage=build >/dev/null  # the build stage
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
base_size=$(docker image inspect -f '{{.Size}}' "$BASE_IMAGE")
log "built $IMAGE: $(awk -v s="$size" -v b="$base_size" 'BEGIN{printf "%.0f MB (base %.0f MB + failproxy %.0f MB)", s/1e6, b/1e6, (s-b)/1e6}')"
docker run --rm --network=none --entrypoint sh "$IMAGE" -c \
    'for c in gcc cc pip; do if command -v $c; then exit 1; fi; done' >/dev/null \
    || fail "a compiler or pip is in the final image"

# ---- 5. the app + sidecar pair from deploy/compose.yaml ---------------------------------------
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
LISTEN=$(free_port); ADMIN=$(free_port); APP_PORT=$(free_port); PEER=$(free_port)
# The peer: another box's app server, on its TCP port (here the demo app on the host).
"$PY" -m failproxy.demo.demoapp --name peer --tcp "127.0.0.1:$PEER" --workers 1 >"$WORK/peer.log" 2>&1 &
PEER_PID=$!
cat >"$WORK/failproxy.toml" <<EOF
[server]
listen = ["127.0.0.1:$LISTEN"]
workers = 2
shutdown_timeout = 30.0     # as deploy/sidecar.toml: compose's stop_grace_period is 35s

[[upstream.server]]
address = "unix:/var/run/app/app.sock"

[[upstream.server]]
address = "127.0.0.1:$PEER"
backup = true

[headers]
upstream_header = true

[admin]
listen = "127.0.0.1:$ADMIN"
EOF
export FAILPROXY_IMAGE="$IMAGE" FAILPROXY_CONFIG="$WORK/failproxy.toml" APP_NAME=box \
    APP_TCP="127.0.0.1:$APP_PORT"
compose config -q || fail "deploy/compose.yaml does not validate"
compose up -d >"$WORK/up.log" 2>&1 || fail "compose up: $(cat "$WORK/up.log")"
log "compose up: failproxy on 127.0.0.1:$LISTEN, admin :$ADMIN, app :$APP_PORT, peer :$PEER"
cid_fp=$(compose ps -q failproxy); cid_app=$(compose ps -q app)
[ -n "$cid_fp" ] && [ -n "$cid_app" ] || fail "compose ps found no containers"

get() {  # get PATH -> head and body of a GET through the sidecar
    curl -sS -i --max-time 20 "http://127.0.0.1:$LISTEN$1" 2>&1 | tr -d '\r'
}
wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local until=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $until ] || fail "not within ${until}s: $what"
        sleep 0.2
    done
}
via_socket() { grep -q '^X-Served-Via: unix$' <<<"$(get /fast)"; }
wait_for 30 "a request through the sidecar reaches the app over the UNIX socket" via_socket

# (a) a request reaches the app container over the UNIX socket in the shared volume
resp=$(get /fast)
grep -q '^HTTP/1.1 200 ' <<<"$resp" || fail "GET /fast: $resp"
grep -q '^X-Served-By: box/' <<<"$resp" || fail "not served by the app container: $resp"
grep -q '^X-Served-Via: unix$' <<<"$resp" || fail "not over the UNIX socket: $resp"
grep -q '^X-Failproxy-Upstream: unix:/var/run/app/app.sock$' <<<"$resp" || fail "upstream: $resp"
sock=$(docker exec "$cid_fp" stat -c 'uid %u, mode %a' /var/run/app/app.sock)
log "ok: GET /fast -> 200 from box over unix:/var/run/app/app.sock (socket $sock)"

# (b) every process runs as non-root: failproxy as uid 10001, the app as 10002
uids() { docker top "$1" -eo pid,uid | awk 'NR > 1 {print $2}' | sort -u | tr '\n' ' '; }
[ "$(uids "$cid_fp")" = "10001 " ] || fail "failproxy container uids: $(uids "$cid_fp")"
[ "$(uids "$cid_app")" = "10002 " ] || fail "app container uids: $(uids "$cid_app")"
# by their titles: the HEALTHCHECK (`python -m failproxy.process.healthcheck`, every 5 s) is a
# process in the container too while it runs (under make test-stress `docker top` once saw 4)
procs=$(docker top "$cid_fp" -eo pid,args | tail -n +2)
masters=$(grep -c ' failproxy master ' <<<"$procs")
workers=$(grep -c ' failproxy worker\[[0-9]*\] ' <<<"$procs")
[ "$masters:$workers" = 1:2 ] || fail "not a master + 2 workers: $procs"
log "ok: non-root: failproxy master + 2 workers uid 10001, app uid 10002"

# (c) the image's HEALTHCHECK turns healthy
health() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$1")" = healthy ]; }
wait_for 40 "HEALTHCHECK healthy" health "$cid_fp"
log "ok: HEALTHCHECK healthy: $(docker inspect -f '{{(index .State.Health.Log 0).Output}}' "$cid_fp" | head -1)"

# (d) the app container stopped: requests fail over to the peer's TCP port
compose stop app >/dev/null 2>&1 || fail "compose stop app"
resp=$(get /fast)
grep -q '^HTTP/1.1 200 ' <<<"$resp" || fail "GET /fast with the app stopped: $resp"
grep -q '^X-Served-By: peer/' <<<"$resp" || fail "not served by the peer: $resp"
grep -q "^X-Failproxy-Upstream: 127.0.0.1:$PEER$" <<<"$resp" || fail "upstream: $resp"
docker logs "$cid_fp" >"$WORK/failproxy.log" 2>&1
grep '"event":"failover"' "$WORK/failproxy.log" >"$WORK/failovers" || true
grep -q "\"to\":\"127.0.0.1:$PEER\"" "$WORK/failovers" \
    || fail "no failover event to the peer in the sidecar's log"
reason=$(tail -1 "$WORK/failovers" | sed 's/.*"reason":"\([a-z_]*\)".*/\1/')
log "ok: app stopped: GET /fast -> 200 from the peer 127.0.0.1:$PEER (failover, reason $reason)"

# (e) docker stop with a 3 s request in flight: it finishes with 200, failproxy exits 0
compose start app >/dev/null 2>&1 || fail "compose start app"
wait_for 30 "the app container serves again" via_socket
curl -sS --max-time 60 -o "$WORK/slow.body" -w '%{http_code}' \
    "http://127.0.0.1:$LISTEN/slow?ms=3000" >"$WORK/slow.code" 2>&1 &
slow=$!
sleep 1
t=$SECONDS
compose stop failproxy >/dev/null 2>&1 || fail "compose stop failproxy"
took=$((SECONDS - t))
wait "$slow" || true
code=$(docker inspect -f '{{.State.ExitCode}}' "$cid_fp")
[ "$(cat "$WORK/slow.code")" = 200 ] && [ "$(cat "$WORK/slow.body")" = "slow 3000 ms" ] \
    || fail "in-flight request: $(cat "$WORK/slow.code") $(cat "$WORK/slow.body")"
[ "$code" = 0 ] || fail "failproxy exited $code after compose stop (137 = killed mid-drain)"
docker logs "$cid_fp" >"$WORK/failproxy.log" 2>&1
grep -q '"event":"stopped"' <<<"$(tail -1 "$WORK/failproxy.log")" || fail "no stopped event last"
log "ok: compose stop failproxy (stop_grace_period 35s, shutdown_timeout 30) with /slow?ms=3000 in flight: 200, exit 0 after ${took}s"
compose down -v >/dev/null 2>&1

# (f) the image's own defaults: its config (shutdown_timeout 8) under a plain `docker stop`
# (10 s). In a network namespace of its own (--network=none: loopback only), which the app and
# the client containers join, as the containers of one pod do.
docker run -d --name "$SOLO" --network=none "$IMAGE" >/dev/null
docker run -d --name "$SOLO-app" --network="container:$SOLO" --volumes-from "$SOLO" \
    --user 10002:10002 --no-healthcheck --entrypoint sh "$IMAGE" \
    -c 'umask 0 && exec python -m failproxy.demo.demoapp --name solo --unix /var/run/app/app.sock --workers 1' >/dev/null
wait_for 40 "HEALTHCHECK healthy with the image's default config" health "$SOLO"
docker run -d --name "$SOLO-client" --network="container:$SOLO" --no-healthcheck \
    --entrypoint python "$IMAGE" -c '
import http.client
conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=30)
conn.request("GET", "/slow?ms=3000")
resp = conn.getresponse()
print(resp.status, resp.getheader("X-Served-Via"), resp.read().decode())' >/dev/null
sleep 1
t=$SECONDS
docker stop "$SOLO" >/dev/null
took=$((SECONDS - t))
docker wait "$SOLO-client" >/dev/null
out=$(docker logs "$SOLO-client" 2>&1)
code=$(docker inspect -f '{{.State.ExitCode}}' "$SOLO")
[ "$out" = "200 unix slow 3000 ms" ] || fail "in-flight request under the default config: $out"
[ "$code" = 0 ] || fail "default config: failproxy exited $code after docker stop"
log "ok: image defaults: healthy, docker stop (10 s) with /slow?ms=3000 in flight: 200, exit 0 after ${took}s"
docker rm -f -v "$SOLO-client" "$SOLO-app" "$SOLO" >/dev/null

# (g) a wheelhouse holding the pure-Python wheel (what a host without a compiler builds): the
# default BUILD=compiled refuses it, saying why; BUILD=pure ships it on purpose.
ctx="$WORK/pure-context"
mkdir -p "$ctx/wheelhouse"
{ find failproxy -name '*.py' -print0
  printf '%s\0' setup.py pyproject.toml README.md LICENSE deploy/docker.toml Dockerfile .dockerignore
} | xargs -0 cp --parents -t "$ctx"
cp wheelhouse/*.whl "$ctx/wheelhouse/"
rm -f "$ctx"/wheelhouse/failproxy-*.whl
FAILPROXY_PURE_BUILD=1 "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps . \
    -w "$ctx/wheelhouse" >"$WORK/wheel-pure.log" 2>&1 \
    || fail "pip wheel (pure): $(grep -v 'is ignored' "$WORK/wheel-pure.log" | tail -5)"
if docker build --network=none --build-arg BASE="$BASE_IMAGE" -t "$IMAGE-pure" "$ctx" \
        >"$WORK/build-pure.log" 2>&1; then
    fail "docker build shipped the pure-Python build without BUILD=pure"
fi
grep -q "not the compiled build" "$WORK/build-pure.log" \
    || fail "the refused build did not say why: $(tail -5 "$WORK/build-pure.log")"
docker build --network=none --build-arg BASE="$BASE_IMAGE" --build-arg BUILD=pure \
    -t "$IMAGE-pure" "$ctx" >"$WORK/build-pure.log" 2>&1 \
    || fail "docker build --build-arg BUILD=pure: $(tail -15 "$WORK/build-pure.log")"
built=$(docker run --rm --network=none "$IMAGE-pure" --version)
[ "${built%(pure Python)}" != "$built" ] || fail "BUILD=pure image runs '$built'"
docker rmi "$IMAGE-pure" >/dev/null
docker image prune -f --filter label=failproxy.stage=build >/dev/null
log "ok: a pure-Python wheel: refused by default (\"not the compiled build\"), shipped with BUILD=pure ($built)"

log "image $IMAGE: $(awk -v s="$size" 'BEGIN{printf "%.0f MB", s/1e6}')"
echo "docker-test: 8 passed, 0 failed in $((SECONDS - T0))s"
