#!/usr/bin/env bash
# A/B of two builds of this repository, in turns in one run (the machine is noisy: only ratios
# of the same run mean something):
#
#   bench/compare.sh BASE_TARGET NEW_TARGET     # each: a target dir with release builds of
#                                               # examples/hello_http and bench/peers' ipc
#
# For each build and round: wrk keep-alive and `Connection: close` against hello_http under
# each policy, the primary's CPU (utime+stime from /proc) per request of the round-robin
# `close` run (`timeout`'s child, the primary of hello_http), and the typed-IPC probe. Prints a markdown table of medians and new/base ratios.
# Knobs: ROUNDS (3), DURATION (5), CONNS (64), WORKERS (2), PORT (18180).
set -euo pipefail
BASE=$1 NEW=$2
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-5} CONNS=${CONNS:-64} WORKERS=${WORKERS:-2}
PORT=${PORT:-18180}
OUT=$(mktemp -d)
TCK=$(getconf CLK_TCK)
log() { printf '[compare %s] %s\n' "$(date +%T)" "$*" >&2; }
SERVER=
cleanup() { [ -n "$SERVER" ] && kill -TERM "$SERVER" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sample() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$OUT/samples.tsv"; }

for round in $(seq "$ROUNDS"); do
  for build in base new; do
    dir=$BASE
    [ $build = new ] && dir=$NEW
    for policy in round-robin shared reuseport; do
      PORT=$PORT CLUSTER_WORKERS=$WORKERS CLUSTER_SCHED_POLICY=$policy \
        timeout -k 5 120 "$dir/release/examples/hello_http" >"$OUT/server.log" 2>&1 &
      SERVER=$!
      PRIMARY=
      for _ in $(seq 100); do
        [ -z "$PRIMARY" ] && PRIMARY=$(pgrep -P "$SERVER" | head -1 || true)
        [ "$(grep -c started "$OUT/server.log" || true)" -ge "$WORKERS" ] &&
          curl -fsS -m 1 -o /dev/null "http://127.0.0.1:$PORT/" && break
        sleep 0.1
      done
      wrk -t1 "-c$CONNS" -d1s "http://127.0.0.1:$PORT/" >/dev/null 2>&1 || true
      for mode in keepalive close; do
        args=(-t1 "-c$CONNS" "-d${DURATION}s" --timeout 2s)
        [ $mode = close ] && args+=(-H 'Connection: close')
        before=$(cpu_of "$PRIMARY")
        wrk "${args[@]}" "http://127.0.0.1:$PORT/" >"$OUT/wrk.txt" 2>&1 || true
        after=$(cpu_of "$PRIMARY")
        rps=$(awk '/^Requests\/sec:/ {print $2}' "$OUT/wrk.txt")
        reqs=$(awk '/requests in/ {print $1}' "$OUT/wrk.txt")
        sample "$policy $mode req/s" $build "${rps:-0}"
        if [ $policy = round-robin ] && [ $mode = close ] && [ -n "$reqs" ]; then
          us=$(awk -v t=$((after - before)) -v r="$reqs" -v k="$TCK" 'BEGIN {printf "%.2f", t / k * 1e6 / r}')
          sample "primary CPU us per RR close request" $build "$us"
        fi
        log "round $round $build $policy $mode: ${rps:-FAILED} req/s"
      done
      kill -TERM "$SERVER" 2>/dev/null || true
      wait "$SERVER" 2>/dev/null || true
      SERVER=
    done
    if [ -x "$dir/release/ipc" ]; then
      timeout -k 2 60 "$dir/release/ipc" >"$OUT/ipc.txt" 2>&1 || log "ipc $build failed"
      line=$(grep -m1 '^RESULT ' "$OUT/ipc.txt" | cut -d' ' -f2- || true)
      log "round $round $build ipc: $line"
      for key in $(echo "$line" | grep -o '"[a-z_0-9]*":[0-9][0-9.]*' | cut -d'"' -f2); do
        val=$(echo "$line" | grep -o "\"$key\":[0-9.]*" | cut -d: -f2)
        sample "ipc $key" $build "$val"
      done
    fi
  done
done

echo "samples: $OUT/samples.tsv" >&2
python3 - "$OUT/samples.tsv" <<'PY'
import sys, statistics, collections
d = collections.defaultdict(lambda: collections.defaultdict(list))
order = []
for line in open(sys.argv[1]):
    k, b, v = line.rstrip("\n").split("\t")
    if k not in order:
        order.append(k)
    d[k][b].append(float(v))
print("| measure | base (median) | new (median) | new / base |")
print("|---|---:|---:|---:|")
for k in order:
    b = statistics.median(d[k]["base"]) if d[k]["base"] else float("nan")
    n = statistics.median(d[k]["new"]) if d[k]["new"] else float("nan")
    print(f"| {k} | {b:.4g} | {n:.4g} | {n / b if b else float('nan'):.3f} |")
PY
