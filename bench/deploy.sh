#!/usr/bin/env bash
# Deploys under wrk: the failed and total requests of a reload (SIGHUP) and of a full upgrade
# (SIGUSR2) to a new build installed at the binary's path, with keep-alive and new-connection
# clients at once; and the time from the signal to the last old process gone.
#
#   bench/deploy.sh                 # both kinds, round-robin; ~40 s on 2 cores
#   POLICY=reuseport bench/deploy.sh upgrade
#
# The two builds are the `fixture_deploy` example and a copy whose build mark is rewritten
# (a different file, different bytes), renamed over the path. Traffic stays on loopback; every
# client runs under `timeout`, the primaries are stopped by the exit trap; only processes this
# script started are signalled, by pid.
#
# Knobs (environment): PORT (18300), DURATION (wrk seconds, 10), CONNS (keep-alive
# connections, 32), CLOSE_CONNS (connections with `Connection: close`, 8), POLICY (round-robin),
# WORKERS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
KINDS=${1:-reload upgrade}
PORT=${PORT:-18300}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
CLOSE_CONNS=${CLOSE_CONNS:-8}
POLICY=${POLICY:-round-robin}
WORKERS=${WORKERS:-2}
command -v wrk >/dev/null || {
  echo "wrk is missing (apt-get install wrk)" >&2
  exit 1
}
cargo build --release --quiet --example fixture_deploy
FIXTURE=$PWD/target/release/examples/fixture_deploy
DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT

# install MARK: the fixture with its build mark set to MARK, renamed over $DIR/app.
install_build() {
  python3 - "$FIXTURE" "$DIR/app.new" "$1" <<'PY'
import sys
src, dst, mark = sys.argv[1], sys.argv[2], sys.argv[3].encode()
data = open(src, "rb").read()
prefix = b"CLUSTER-FIXTURE-BUILD:"
assert data.count(prefix) == 1 and len(mark) == 10
at = data.index(prefix) + len(prefix)
open(dst, "wb").write(data[:at] + mark + data[at + 10:])
PY
  chmod 755 "$DIR/app.new"
  mv "$DIR/app.new" "$DIR/app"
}

gone() { ! kill -0 "$1" 2>/dev/null; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# wrk's summary: `requests errors` (errors = socket errors + non-2xx answers).
summary() {
  awk '/requests in/ {req=$1}
       /Socket errors/ {gsub(",", ""); err+=$4+$6+$8+$10}
       /Non-2xx/ {err+=$NF}
       END {print req+0, err+0}' "$1"
}

for kind in $KINDS; do
  install_build "v1:a:serve"
  : >"$DIR/out"
  # Not under `timeout`: the signals go to the primary itself (the trap stops it by pid).
  PORT=$PORT CLUSTER_WORKERS=$WORKERS CLUSTER_SCHED_POLICY=$POLICY GRACE_MS=10000 \
    "$DIR/app" >"$DIR/out" 2>"$DIR/err" &
  primary=$!
  PIDS+=("$primary")
  for _ in $(seq 100); do
    [ "$(grep -c " listening " "$DIR/out")" -ge "$WORKERS" ] && break
    sleep 0.1
  done
  old_workers=$(awk -v p="$primary" '$1 == p && $2 == "listening" {print $4}' "$DIR/out")
  timeout $((DURATION + 20)) wrk -t1 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$PORT/" >"$DIR/ka" &
  ka=$!
  timeout $((DURATION + 20)) wrk -t1 -c"$CLOSE_CONNS" -d"${DURATION}s" -H "Connection: close" \
    "http://127.0.0.1:$PORT/" >"$DIR/close" &
  close=$!
  sleep $((DURATION / 3))
  install_build "v2:a:serve"
  t0=$(now_ms)
  took=
  if [ "$kind" = reload ]; then
    kill -HUP "$primary"
    # Done when both replacements listen and both old workers are gone.
    for _ in $(seq 300); do
      if [ "$(grep -c " listening " "$DIR/out")" -ge $((2 * WORKERS)) ]; then
        all=1
        for w in $old_workers; do gone "$w" || all=; done
        [ -n "$all" ] && { took=$(($(now_ms) - t0)); break; }
      fi
      sleep 0.01
    done
    survivor=$primary
  else
    kill -USR2 "$primary"
    for _ in $(seq 1000); do
      all=1
      for p in "$primary" $old_workers; do gone "$p" || all=; done
      [ -n "$all" ] && { took=$(($(now_ms) - t0)); break; }
      sleep 0.01
    done
    survivor=$(awk -v p="$primary" '$1 != p && $2 == "primary" {print $1; exit}' "$DIR/out")
    PIDS+=("$survivor")
  fi
  wait "$ka" "$close"
  read -r ka_req ka_err < <(summary "$DIR/ka")
  read -r cl_req cl_err < <(summary "$DIR/close")
  versions=$(curl -s "http://127.0.0.1:$PORT/" | awk '{print $1}')
  printf '%-8s %-12s keep-alive %s requests, %s failed; Connection: close %s requests, %s failed; signal to last old process gone: %s ms; now serving %s\n' \
    "$kind" "$POLICY" "$ka_req" "$ka_err" "$cl_req" "$cl_err" "${took:-?}" "$versions"
  kill -TERM "$survivor"
  for _ in $(seq 500); do gone "$survivor" && break; sleep 0.01; done
done
