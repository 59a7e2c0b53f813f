#!/usr/bin/env bash
# End-to-end check of docker-compose.yml: build, start postgres, redis, api, worker and scheduler, wait for
# their health checks, create an API key, run a small search through the Celery worker, read its Pareto front
# and an allocation, restart the worker, check readiness and a second search, then take the stack down.
# Prints every step with its time and a summary; exits non-zero on the first failure.
#
#   bench/compose_check.sh                        # official base images (needs registry access)
#   bench/compose_check.sh --offline-base --torch-wheel DIR/torch-2.13.0+cpu-cp311-...whl
#
# Options:
#   --offline-base      build local stand-ins for python:3.11-slim, postgres:16-alpine and redis:7-alpine from
#                       Debian packages (debootstrap, needs root and a Debian mirror) and build/run with them;
#                       they are tagged bitsearch-check/*, reused, and rebuilt when their files change (the
#                       defaults of the project's files stay the official images)
#   --rebuild-base      rebuild the stand-ins (debootstrap included) even if they are up to date
#   --debian-mirror URL Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   --ca-bundle FILE    a CA bundle the python stand-in trusts (a TLS-intercepting egress proxy)
#   --torch-wheel FILE  install torch from this wheel, served on 127.0.0.1 during the build (builds then run
#                       on the host network; torch's own dependencies come from --torch-index)
#   --wheel-port N      the local port the wheel is served on (default 8765)
#   --torch-index URL   the index for torch (default: the Dockerfile's; https://pypi.org/simple with a wheel)
#   --build-network N   network of the image builds (default: host with --offline-base or a wheel)
#   --project NAME      compose project name (default bitsearch-check)
#   --port N            host port of the API (default 8000)
#   --remove-volumes    take the stack down with its volumes (default: keep them)
#   --keep-running      leave the stack running at the end
#   --timeout S         limit for each wait (default 600)
# Environment: COMPOSE (default "docker compose", else "docker-compose").
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OFFLINE=0 REBUILD_BASE=0 MIRROR=http://deb.debian.org/debian CA_BUNDLE="" TORCH_WHEEL="" TORCH_INDEX=""
WHEEL_PORT=8765 BUILD_NETWORK="" PROJECT=bitsearch-check PORT=8000 REMOVE_VOLUMES=0 KEEP_RUNNING=0 TIMEOUT=600
while [ $# -gt 0 ]; do
  case "$1" in
    --offline-base) OFFLINE=1 ;;
    --rebuild-base) OFFLINE=1; REBUILD_BASE=1 ;;
    --debian-mirror) MIRROR=$2; shift ;;
    --ca-bundle) CA_BUNDLE=$2; shift ;;
    --torch-wheel) TORCH_WHEEL=$2; shift ;;
    --torch-index) TORCH_INDEX=$2; shift ;;
    --wheel-port) WHEEL_PORT=$2; shift ;;
    --build-network) BUILD_NETWORK=$2; shift ;;
    --project) PROJECT=$2; shift ;;
    --port) PORT=$2; shift ;;
    --remove-volumes) REMOVE_VOLUMES=1 ;;
    --keep-running) KEEP_RUNNING=1 ;;
    --timeout) TIMEOUT=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${COMPOSE:-}" ]; then
  if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"
  elif command -v docker-compose >/dev/null; then COMPOSE=docker-compose
  else echo "no Docker Compose found (docker compose plugin or docker-compose)" >&2; exit 2; fi
fi
for tool in docker curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 2; }
done

START=$(date +%s.%N)
declare -a SUMMARY=()
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
log() { printf '[%7.1fs] %s\n' "$(python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$START" "$(now)")" "$*"; }
record() { SUMMARY+=("$(printf '%-44s %s' "$1" "$2")"); log "$1: $2"; }
fail() { log "FAILED: $*"; exit 1; }
dc() { $COMPOSE -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/bitsearch-compose-check.XXXXXX")
WHEEL_SERVER_PID=""
STACK_UP=0
cleanup() {
  local rc=$?
  [ -n "$WHEEL_SERVER_PID" ] && kill "$WHEEL_SERVER_PID" 2>/dev/null || true
  [ -n "${UP_PID:-}" ] && kill "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null || true
  if [ "$STACK_UP" = 1 ]; then
    if [ $rc -ne 0 ]; then
      log "logs of the stack (last 40 lines per service):"
      dc ps -a || true
      dc logs --no-color --tail 40 || true
    fi
    if [ "$KEEP_RUNNING" = 1 ]; then
      log "leaving the stack running (project $PROJECT)"
    else
      local t; t=$(now)
      if [ "$REMOVE_VOLUMES" = 1 ]; then dc down -v --remove-orphans; else dc down --remove-orphans; fi
      log "down ($([ "$REMOVE_VOLUMES" = 1 ] && echo "volumes removed" || echo "volumes kept")): $(since "$t") s"
    fi
  fi
  # debootstrap mounts /proc and /sys inside its target; never delete through a mount left behind.
  awk -v d="$SCRATCH/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l 2>/dev/null || true
  rm -rf --one-file-system "$SCRATCH"
  if [ $rc -eq 0 ]; then
    echo; echo "== summary ($COMPOSE, project $PROJECT)"; printf '%s\n' "${SUMMARY[@]}"
    echo "PASSED"
  else
    echo "FAILED (exit $rc)"
  fi
  exit $rc
}
trap cleanup EXIT

log "compose: $($COMPOSE version 2>/dev/null | head -1); docker engine $(docker version -f '{{.Server.Version}}')"

# ---------------------------------------------------------------------------------------------- base images
if [ "$OFFLINE" = 1 ]; then
  export BITSEARCH_BASE_IMAGE=bitsearch-check/python:3.11-slim
  export BITSEARCH_POSTGRES_IMAGE=bitsearch-check/postgres:16-alpine
  export BITSEARCH_REDIS_IMAGE=bitsearch-check/redis:7-alpine
  BUILD_NETWORK=${BUILD_NETWORK:-host}
  have() { docker image inspect "$1" >/dev/null 2>&1; }
  t=$(now)
  if [ "$REBUILD_BASE" = 1 ] || ! have bitsearch-check/debian:bookworm; then
    command -v debootstrap >/dev/null || fail "--offline-base needs debootstrap (apt-get install debootstrap)"
    log "debootstrap bookworm (minbase) from $MIRROR"
    debootstrap --variant=minbase bookworm "$SCRATCH/rootfs" "$MIRROR" > "$SCRATCH/debootstrap.log" 2>&1 \
      || { tail -20 "$SCRATCH/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$SCRATCH"/rootfs/var/cache/apt/archives/*.deb "$SCRATCH"/rootfs/var/lib/apt/lists/*
    tar -C "$SCRATCH/rootfs" -c . | docker import - bitsearch-check/debian:bookworm >/dev/null
    rm -rf "$SCRATCH/rootfs"
  fi
  mkdir -p "$SCRATCH/base"
  cp "$ROOT"/bench/compose/* "$SCRATCH/base/"
  if [ -n "$CA_BUNDLE" ]; then cp "$CA_BUNDLE" "$SCRATCH/base/extra-ca.crt"; else : > "$SCRATCH/base/extra-ca.crt"; fi
  # Each stand-in carries a hash of what it was built from (the Debian image, its files, the CA bundle) and
  # is rebuilt when that changes.
  base_id=$(docker image inspect -f '{{.Id}}' bitsearch-check/debian:bookworm)
  for image in python:3.11-slim postgres:16-alpine redis:7-alpine; do
    name=${image%%:*}
    hash=$( (echo "$base_id"; cat "$SCRATCH/base/$name.Dockerfile" "$SCRATCH/base/extra-ca.crt";
             cat "$SCRATCH/base/$name-entrypoint.sh" 2>/dev/null || true) | sha256sum | cut -c1-16)
    built=$(docker image inspect -f '{{index .Config.Labels "bitsearch-check.hash"}}' "bitsearch-check/$image" \
            2>/dev/null || true)
    if [ "$REBUILD_BASE" = 1 ] || [ "$built" != "$hash" ]; then
      log "building the stand-in bitsearch-check/$image"
      docker build --network "$BUILD_NETWORK" -q -t "bitsearch-check/$image" --label "bitsearch-check.hash=$hash" \
        -f "$SCRATCH/base/${image%%:*}.Dockerfile" "$SCRATCH/base" >/dev/null 2>"$SCRATCH/base-build.log" \
        || { cat "$SCRATCH/base-build.log"; fail "building bitsearch-check/$image"; }
    fi
  done
  record "offline stand-in base images ready" "$(since "$t") s"
fi

# ---------------------------------------------------------------------------------------------- torch wheel
if [ -n "$TORCH_WHEEL" ]; then
  [ -f "$TORCH_WHEEL" ] || fail "no wheel at $TORCH_WHEEL"
  # A fixed port: the wheel's URL is a build argument, and a new one each run would defeat the layer cache.
  python3 -c "import socket, sys; socket.create_server(('127.0.0.1', int(sys.argv[1]))).close()" "$WHEEL_PORT" \
    2>/dev/null || fail "port $WHEEL_PORT is busy: pick another with --wheel-port"
  python3 -m http.server "$WHEEL_PORT" --bind 127.0.0.1 --directory "$(dirname "$TORCH_WHEEL")" \
    > "$SCRATCH/wheel-server.log" 2>&1 &
  WHEEL_SERVER_PID=$!
  name=$(basename "$TORCH_WHEEL")
  export BITSEARCH_TORCH_SPEC="http://127.0.0.1:$WHEEL_PORT/${name//+/%2B}"
  export BITSEARCH_TORCH_INDEX=${TORCH_INDEX:-https://pypi.org/simple}
  BUILD_NETWORK=${BUILD_NETWORK:-host}  # the build reaches the wheel on the host's loopback
  for _ in $(seq 50); do curl -sfI "$BITSEARCH_TORCH_SPEC" >/dev/null && break; sleep 0.1; done
  curl -sfI "$BITSEARCH_TORCH_SPEC" >/dev/null || fail "the wheel server does not answer"
  log "torch from $name (served on 127.0.0.1:$WHEEL_PORT), its dependencies from $BITSEARCH_TORCH_INDEX"
elif [ -n "$TORCH_INDEX" ]; then
  export BITSEARCH_TORCH_INDEX=$TORCH_INDEX
fi
[ -n "$BUILD_NETWORK" ] && export BITSEARCH_BUILD_NETWORK=$BUILD_NETWORK
export BITSEARCH_PORT=$PORT BITSEARCH_QAT_QUEUE=cpu  # no GPU worker here: fine-tuning on the CPU worker

# ---------------------------------------------------------------------------------------------- compose file
CONFIG=$(dc config) || fail "docker-compose.yml does not validate"
SERVICES_ALL=$(dc config --services | sort | tr '\n' ' ')
case " $SERVICES_ALL" in *" worker-gpu "*) ;; *) fail "worker-gpu is missing from the compose file" ;; esac
grep -q "driver: nvidia" <<<"$CONFIG" || fail "worker-gpu lost its GPU reservation"
log "docker-compose.yml validates (services: $SERVICES_ALL; worker-gpu reserves an NVIDIA GPU, not started here)"

SERVICES=(postgres redis api worker scheduler)
t=$(now)
log "building bitsearch:latest (base ${BITSEARCH_BASE_IMAGE:-python:3.11-slim}, build network ${BUILD_NETWORK:-default})"
dc build api > "$SCRATCH/build.log" 2>&1 || { tail -40 "$SCRATCH/build.log"; fail "build"; }
record "build bitsearch:latest" "$(since "$t") s"

t=$(now)
STACK_UP=1
# In the background, so that the wait below sees each service turn healthy (up itself waits on depends_on).
dc up -d --build "${SERVICES[@]}" > "$SCRATCH/up.log" 2>&1 &
UP_PID=$!

health() {  # a service container's health status, or its state while it is not running (created, exited...)
  local id; id=$(dc ps -a -q "$1" 2>/dev/null | head -1)
  [ -n "$id" ] || { echo missing; return; }
  docker inspect -f '{{if ne .State.Status "running"}}{{.State.Status}}{{else if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' \
    "$id" 2>/dev/null || echo gone
}
wait_healthy() {  # wait_healthy SERVICE...: logs each one as it turns healthy
  local deadline=$(( $(date +%s) + TIMEOUT )) t0 s st pending seen=" "
  t0=$(now)
  while :; do
    pending=""
    for s in "$@"; do
      st=$(health "$s")
      if [ "$st" = healthy ]; then
        case "$seen" in *" $s "*) ;; *) seen="$seen$s "; log "  $s healthy after $(since "$t0") s" ;; esac
      else
        pending="$pending $s($st)"
      fi
    done
    if [ -n "${UP_PID:-}" ] && ! kill -0 "$UP_PID" 2>/dev/null; then
      wait "$UP_PID" || { cat "$SCRATCH/up.log"; fail "up"; }
      UP_PID=""
      log "  up -d --build returned"
    fi
    [ -z "$pending" ] && [ -z "${UP_PID:-}" ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || fail "not healthy after ${TIMEOUT}s:$pending"
    sleep 1
  done
}
wait_healthy "${SERVICES[@]}"
record "up -d --build -> all 5 services healthy" "$(since "$t") s"

# ---------------------------------------------------------------------------------------------- the API
API=http://127.0.0.1:$PORT
KEY=$(dc exec -T api bitsearch keys create --tenant check --name compose-check | grep -E '^bsk_' | head -1) || true
[ -n "$KEY" ] || fail "no key from 'bitsearch keys create'"
log "API key created for the tenant 'check'"
AUTH=(-H "Authorization: Bearer $KEY")

jget() {  # jget JSON EXPR: evaluate EXPR on the parsed JSON `d`
  python3 -c "import json, sys; d = json.loads(sys.argv[1]); print(eval(sys.argv[2]))" "$1" "$2"
}
SMALL_SEARCH='{"model": "zoo:digits-mlp", "data": "zoo:digits", "options": {"weight_bits": [2, 4, 8]}, "sensitivity": {"method": "fisher"},
  "budgets": [{"metric": "avg_weight_bits", "value": 4}], "pareto_points": 3, "eval_limit": 200, "calib_size": 64}'

run_search() {  # run_search LABEL: POST the small search, poll it to its end; sets SEARCH_URL, SEARCH_JSON, JOB_ID
  local label=$1 t body code deadline st last=""
  t=$(now)
  body=$(curl -sS -o "$SCRATCH/post.json" -w '%{http_code}' -X POST "$API/search" "${AUTH[@]}" \
         -H 'Content-Type: application/json' -d "$SMALL_SEARCH")
  [ "$body" = 202 ] || fail "POST /search answered $body: $(cat "$SCRATCH/post.json")"
  SEARCH_URL=$(jget "$(cat "$SCRATCH/post.json")" 'd["url"]')
  log "$label: POST /search -> 202, $SEARCH_URL"
  deadline=$(( $(date +%s) + TIMEOUT ))
  while :; do
    SEARCH_JSON=$(curl -sS "${AUTH[@]}" "$SEARCH_URL")
    st=$(jget "$SEARCH_JSON" 'd["status"]')
    code=$(jget "$SEARCH_JSON" '"%s %.0f %% %s" % (d["status"], d["progress"] * 100, d["message"])')
    [ "$code" != "$last" ] && log "  $code" && last=$code
    case "$st" in
      succeeded) break ;;
      failed|cancelled) fail "$label ended $st: $(jget "$SEARCH_JSON" 'd["error"]')" ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || fail "$label still $st after ${TIMEOUT}s"
    sleep 0.5
  done
  JOB_ID=$(jget "$SEARCH_JSON" 'd["job_id"]')
  record "$label: POST /search -> succeeded" "$(since "$t") s"
}
check_ran_on_celery() {  # the job's worker_id names the worker container's host: it ran on the Celery worker
  local worker_host job
  worker_host=$(docker inspect -f '{{.Config.Hostname}}' "$(dc ps -q worker)")
  dc exec -T api bitsearch jobs "$JOB_ID" --json /tmp/compose-check-job.json >/dev/null || fail "bitsearch jobs $JOB_ID"
  job=$(dc exec -T api cat /tmp/compose-check-job.json | python3 -c "import json, sys; print(json.load(sys.stdin)['worker_id'])")
  case "$job" in
    "celery:$worker_host:"*) log "  job $JOB_ID ran on the Celery worker ($job)" ;;
    *) fail "job $JOB_ID ran on '$job', not on the Celery worker container ($worker_host)" ;;
  esac
}

code=$(curl -sS -o /dev/null -w '%{http_code}' "$API/readyz"); [ "$code" = 200 ] || fail "/readyz answered $code"
log "search 1: zoo:digits-mlp on zoo:digits (on a new data volume the worker first trains the model and caches it there)"
run_search "search 1"
check_ran_on_celery

PARETO=$(curl -sSf "${AUTH[@]}" "$SEARCH_URL/pareto") || fail "GET /pareto"
npoints=$(jget "$PARETO" 'len(d["points"])')
[ "$npoints" -ge 1 ] || fail "the Pareto front has no points"
log "  /pareto: $npoints points, $(jget "$PARETO" 'len(d["uniform"])') uniform baselines, $(jget "$PARETO" 'len(d["recommendations"])') recommendations"
ALLOC=$(curl -sSf "${AUTH[@]}" "$SEARCH_URL/allocations/0") || fail "GET /allocations/0"
[ "$(jget "$ALLOC" 'd.get("schema")')" = bitsearch.allocation ] || fail "/allocations/0 is not an allocation"
log "  /allocations/0: layers (weight/activation bits) $(jget "$ALLOC" '", ".join("%s %s/%s" % (k, v["weight_bits"], v.get("activation_bits", 32)) for k, v in d["layers"].items())')"

# ---------------------------------------------------------------------------------------------- restart
t=$(now)
dc restart worker > "$SCRATCH/restart.log" 2>&1 || { cat "$SCRATCH/restart.log"; fail "restart worker"; }
log "restart worker: $(since "$t") s (stop and start)"
code=$(curl -sS -o /dev/null -w '%{http_code}' "$API/readyz"); [ "$code" = 200 ] || fail "/readyz answered $code after the restart"
log "  /readyz: 200"
log "search 2: posted while the restarted worker is still booting (the job waits in Redis until it takes it)"
run_search "search 2"
check_ran_on_celery
record "restart worker -> second search succeeded" "$(since "$t") s"
wait_healthy worker
record "restart worker -> worker healthy again" "$(since "$t") s"

# ---------------------------------------------------------------------------------------------- the rest
dc logs --no-color worker scheduler > "$SCRATCH/logs.txt" 2>&1
grep -q "Sending due task recover-jobs" "$SCRATCH/logs.txt" || fail "the scheduler (beat) sent no task"
grep -q "Task bitsearch.recover.*succeeded" "$SCRATCH/logs.txt" || fail "the worker never ran beat's recover task"
log "the scheduler (beat) sends its periodic tasks and the worker runs them: $(grep -c 'Task bitsearch.recover.*succeeded' "$SCRATCH/logs.txt") recover runs so far"
for s in "${SERVICES[@]}"; do [ "$(health "$s")" = healthy ] || fail "$s is $(health "$s") at the end"; done
log "all services still healthy"
for image in bitsearch:latest ${BITSEARCH_POSTGRES_IMAGE:-postgres:16-alpine} ${BITSEARCH_REDIS_IMAGE:-redis:7-alpine}; do
  record "image size $image" "$(docker image inspect -f '{{.Size}}' "$image" | python3 -c 'import sys; print(f"{int(sys.stdin.read()) / 1e6:.0f} MB")')"
done
record "total" "$(since "$START") s"
