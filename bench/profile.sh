#!/usr/bin/env bash
# Profiles `hello_http` (2 workers) under `wrk -H 'Connection: close'`: where the primary's and
# the workers' time goes. Needs `perf` (linux-perf); run bench/run.sh once first (it builds).
#
#   bench/profile.sh [round-robin|shared|reuseport]    # default round-robin
#
# Writes bench/results/profile-POLICY/: perf.data of the primary (DWARF call graphs), a
# system-wide perf.data, `perf stat` of the primary and of each worker, and text reports.
set -euo pipefail
cd "$(dirname "$0")/.."
POLICY=${1:-round-robin}
PORT=${PORT:-18300}
OUT=bench/results/profile-$POLICY
rm -rf "$OUT"
mkdir -p "$OUT"
command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 1; }
HELLO=target/release/examples/hello_http

PORT=$PORT CLUSTER_WORKERS=2 CLUSTER_SCHED_POLICY=$POLICY timeout -k 5 60 "$HELLO" >"$OUT/server.log" 2>&1 &
TPID=$!
trap 'kill -TERM $TPID 2>/dev/null || true; wait $TPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  [ "$(grep -c started "$OUT/server.log" || true)" -ge 2 ] && break
  sleep 0.1
done
PRIMARY=$(pgrep -P "$TPID")
WORKERS=$(pgrep -P "$PRIMARY" | tr '\n' ' ')
echo "primary $PRIMARY, workers $WORKERS"

timeout 30 wrk -t1 -c64 -d14s -H 'Connection: close' "http://127.0.0.1:$PORT/" >"$OUT/wrk.txt" 2>&1 &
WRK=$!
sleep 2
# Where everything's cycles go (wrk, workers, primary, kernel), then the primary alone.
perf record -q -a -g -F 499 -o "$OUT/system.data" -- sleep 3 2>/dev/null
STATS=()
perf stat -e task-clock,context-switches,cpu-migrations -p "$PRIMARY" -o "$OUT/stat-primary.txt" -- sleep 2 &
STATS+=($!)
for w in $WORKERS; do
  perf stat -e task-clock,context-switches,cpu-migrations -p "$w" -o "$OUT/stat-worker-$w.txt" -- sleep 2 &
  STATS+=($!)
done
for j in "${STATS[@]}"; do wait "$j" || true; done
# System calls per process over 2 s (divide by the connections served then: req/s x 2).
SC=accept4,sendmsg,recvmsg,recvfrom,epoll_wait,epoll_ctl,futex,close,fcntl,ioctl,getpeername,write,writev,shutdown
EV=$(echo "$SC" | tr ',' '\n' | sed 's/^/syscalls:sys_enter_/' | paste -sd,)
STATS=()
perf stat -e "$EV" -p "$PRIMARY" -o "$OUT/syscalls-primary.txt" -- sleep 2 &
STATS+=($!)
for w in $WORKERS; do
  perf stat -e "$EV" -p "$w" -o "$OUT/syscalls-worker-$w.txt" -- sleep 2 &
  STATS+=($!)
done
for j in "${STATS[@]}"; do wait "$j" || true; done
perf record -q --call-graph dwarf,32768 -F 999 -p "$PRIMARY" -o "$OUT/primary.data" -- sleep 3 2>/dev/null
wait "$WRK" || true

perf report -i "$OUT/system.data" --no-children --sort comm,dso --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | head -30 >"$OUT/system-by-process.txt" || true
perf report -i "$OUT/primary.data" --no-children --sort sym --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | head -50 >"$OUT/primary-self.txt" || true
perf report -i "$OUT/primary.data" --children --sort sym --stdio -g none 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | head -80 >"$OUT/primary-children.txt" || true
grep -E 'Requests/sec|errors' "$OUT/wrk.txt"
cat "$OUT"/stat-*.txt | grep -E 'task-clock|context-switches|cpu-migrations|^ Performance'
echo "--- system calls over 2 s"
for f in "$OUT"/syscalls-*.txt; do
  echo "$(basename "$f" .txt): $(awk '/syscalls:sys_enter_/ {gsub(/syscalls:sys_enter_/, "", $2); gsub(/,/, "", $1); printf "%s=%s ", $2, $1}' "$f")"
done
echo "--- system, by process"; head -15 "$OUT/system-by-process.txt"
echo "--- primary, self"; head -25 "$OUT/primary-self.txt"
