#!/usr/bin/env bash
# The benchmark suite of issue 6, from one command:
#
#   bench/run.sh            # ~5 minutes on 2 cores; writes bench/results/latest.md
#
# Installs what it lacks (wrk and Node from Debian's packages), builds in release, then runs
# every system in turns (A B C ... A B C ..., ROUNDS rounds) and writes a markdown table of
# medians and ratios with the machine's facts. Traffic stays on loopback; every process runs
# under `timeout`; only processes this script started (and their children) are ever signalled.
#
# Knobs (environment): ROUNDS (3), IPC_ROUNDS (5), DURATION (wrk seconds, 5), CONNS (64), WORKERS (2),
# BASE_PORT (18080), SKIP_HTTP=1 / SKIP_IPC=1 / SKIP_LIFE=1 to leave a part out.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
WORKERS=${WORKERS:-2}
IPC_ROUNDS=${IPC_ROUNDS:-5}
BASE_PORT=${BASE_PORT:-18080}
RES=bench/results
RAW=$RES/raw
mkdir -p "$RAW"
rm -f "$RAW"/*
SAMPLES=$RAW/samples.tsv
: >"$SAMPLES"
log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }

# ---- prerequisites ---------------------------------------------------------------------------
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v node >/dev/null || need_pkgs+=(nodejs)
command -v curl >/dev/null || need_pkgs+=(curl)
if ((${#need_pkgs[@]})); then
  log "installing ${need_pkgs[*]} from Debian's packages"
  SUDO=
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

log "building (release)"
cargo build --release --quiet --example hello_http --example messages
cargo build --release --quiet --manifest-path bench/peers/Cargo.toml --target-dir "$ROOT/target"
HELLO=$ROOT/target/release/examples/hello_http
TOKIO=$ROOT/target/release/tokio_hyper
IPC=$ROOT/target/release/ipc
LIFE=$ROOT/target/release/lifecycle

# ---- processes: started under `timeout`, stopped by PID only ----------------------------------
STARTED=()
descendants() {
  local c
  for c in $(pgrep -P "$1" 2>/dev/null || true); do
    echo "$c"
    descendants "$c"
  done
}
stop_tree() {
  local pid=$1 tree p
  tree="$(descendants "$pid")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  for p in $pid $tree; do kill -KILL "$p" 2>/dev/null || true; done
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local p
  for p in "${STARTED[@]}"; do stop_tree "$p"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start LOG CMD... : runs CMD in the background (at most 120 s), sets SERVER_PID.
start() {
  local logf=$1
  shift
  timeout -k 5 120 "$@" >"$logf" 2>&1 &
  SERVER_PID=$!
  STARTED+=("$SERVER_PID")
}
stop() {
  stop_tree "$1"
  local keep=() p
  for p in "${STARTED[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  STARTED=("${keep[@]}")
}
# wait_ready PORT LOG PATTERN COUNT: COUNT lines of PATTERN in LOG and an answer on PORT (20 s).
wait_ready() {
  local port=$1 logf=$2 pat=$3 count=$4
  for _ in $(seq 200); do
    if [ "$(grep -c -- "$pat" "$logf" 2>/dev/null || true)" -ge "$count" ] &&
      curl -fsS -m 1 -o /dev/null "http://127.0.0.1:$port/"; then
      return 0
    fi
    sleep 0.1
  done
  log "server on $port did not come up; its log:"
  cat "$logf" >&2
  return 1
}
# Percentage of all CPUs busy over half a second (none of our servers is running when it is
# called): other work on the machine skews every figure, so wait up to 60 s for quiet and
# record what was left.
cpu_busy() {
  local a b
  a=($(awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat))
  sleep 0.5
  b=($(awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat))
  awk -v u=$((b[0] - a[0])) -v i=$((b[1] - a[1])) 'BEGIN {printf "%.0f", (u + i) ? 100 * u / (u + i) : 0}'
}
wait_quiet() {
  local b
  for _ in $(seq 60); do
    b=$(cpu_busy)
    [ "$b" -le 10 ] && break
    sleep 0.5
  done
  [ "$b" -gt 10 ] && log "  machine still ${b}% busy with other work"
  sample busy "$1" pct "$2" "$b"
}
sample() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$SAMPLES"; }

# wrk_run SYSTEM MODE PORT ROUND
wrk_run() {
  local sys=$1 mode=$2 port=$3 round=$4 out args rps errs
  out=$RAW/wrk-$sys-$mode-$round.txt
  args=(-t1 "-c$CONNS" "-d${DURATION}s" --timeout 2s)
  [ "$mode" = close ] && args+=(-H 'Connection: close')
  timeout -k 2 $((DURATION + 20)) wrk "${args[@]}" "http://127.0.0.1:$port/" >"$out" 2>&1 || true
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
  errs=$(awk '/Socket errors|Non-2xx/ {printf "%s; ", $0}' "$out")
  [ -n "$errs" ] && log "  $sys $mode: $errs"
  sample http "$sys" "$mode" "$round" "${rps:-0}"
  log "  $sys $mode round $round: ${rps:-FAILED} req/s"
}

# ---- HTTP: wrk against each system, in turns ---------------------------------------------------
SYSTEMS=(ours-rr ours-shared ours-reuseport node-rr node-none tokio)
server_cmd() {
  case $1 in
  ours-rr) echo "env PORT=$2 CLUSTER_WORKERS=$WORKERS CLUSTER_SCHED_POLICY=round-robin $HELLO" ;;
  ours-shared) echo "env PORT=$2 CLUSTER_WORKERS=$WORKERS CLUSTER_SCHED_POLICY=shared $HELLO" ;;
  ours-reuseport) echo "env PORT=$2 CLUSTER_WORKERS=$WORKERS CLUSTER_SCHED_POLICY=reuseport $HELLO" ;;
  node-rr) echo "env PORT=$2 WORKERS=$WORKERS SCHED=rr node $ROOT/bench/node_cluster.js" ;;
  node-none) echo "env PORT=$2 WORKERS=$WORKERS SCHED=none node $ROOT/bench/node_cluster.js" ;;
  tokio) echo "env PORT=$2 $TOKIO" ;;
  esac
}
if [ "${SKIP_HTTP:-0}" != 1 ]; then
  for round in $(seq "$ROUNDS"); do
    log "HTTP round $round/$ROUNDS"
    i=0
    for sys in "${SYSTEMS[@]}"; do
      port=$((BASE_PORT + i))
      i=$((i + 1))
      logf=$RAW/server-$sys-$round.log
      wait_quiet "$sys" "$round"
      # shellcheck disable=SC2046
      start "$logf" $(server_cmd "$sys" "$port")
      pid=$SERVER_PID
      want=$WORKERS pat=started
      [ "$sys" = tokio ] && want=1 pat=listening
      if wait_ready "$port" "$logf" "$pat" "$want"; then
        timeout 10 wrk -t1 "-c$CONNS" -d1s "http://127.0.0.1:$port/" >/dev/null 2>&1 || true
        wrk_run "$sys" keepalive "$port" "$round"
        wrk_run "$sys" close "$port" "$round"
      fi
      stop "$pid"
    done
  done
fi

# ---- IPC: typed messages vs process.send -------------------------------------------------------
result_line() { grep -m1 '^RESULT ' "$1" | cut -d' ' -f2-; }
# Each probe runs twice per round: free to use both CPUs (`ipc`), and with every process and
# thread of both sides on CPU 0 (`ipc1`), which leaves out cross-CPU wake-up latency (large and
# erratic on a small VM) and so shows the software path alone.
if [ "${SKIP_IPC:-0}" != 1 ]; then
  for round in $(seq "$IPC_ROUNDS"); do
    log "IPC round $round/$IPC_ROUNDS"
    wait_quiet ipc "$round"
    timeout -k 2 60 "$IPC" >"$RAW/ipc-ours-$round.txt" 2>&1 || log "  ours failed"
    timeout -k 2 60 node bench/node_ipc.js >"$RAW/ipc-node-$round.txt" 2>&1 || log "  node failed"
    timeout -k 2 60 taskset -c 0 "$IPC" >"$RAW/ipc1-ours-$round.txt" 2>&1 || log "  ours failed"
    timeout -k 2 60 taskset -c 0 node bench/node_ipc.js >"$RAW/ipc1-node-$round.txt" 2>&1 ||
      log "  node failed"
    for cat in ipc ipc1; do
      for s in ours node; do
        r=$(result_line "$RAW/$cat-$s-$round.txt" || true)
        [ -n "$r" ] && sample "$cat" "$s" json "$round" "$r" && log "  $cat $s: $r"
      done
    done
  done
fi

# ---- lifecycle: fork-to-online, respawn, idle RSS ----------------------------------------------
if [ "${SKIP_LIFE:-0}" != 1 ]; then
  for round in $(seq "$ROUNDS"); do
    log "lifecycle round $round/$ROUNDS"
    wait_quiet life "$round"
    PORT=$((BASE_PORT + 20)) timeout -k 2 60 "$LIFE" >"$RAW/life-ours-$round.txt" 2>&1 ||
      log "  ours failed"
    PORT=$((BASE_PORT + 21)) timeout -k 2 60 node bench/node_lifecycle.js \
      >"$RAW/life-node-$round.txt" 2>&1 || log "  node failed"
    for s in ours node; do
      r=$(result_line "$RAW/life-$s-$round.txt" || true)
      [ -n "$r" ] && sample life "$s" json "$round" "$r" && log "  $s: $r"
    done
  done
fi

# ---- report ------------------------------------------------------------------------------------
{
  echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
  echo "nproc=$(nproc)"
  echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel=$(uname -sr)"
  echo "memory=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  echo "rustc=$(rustc --version)"
  echo "node=$(node --version)"
  echo "wrk=$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
  echo "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)"
  echo "params=ROUNDS=$ROUNDS IPC_ROUNDS=$IPC_ROUNDS DURATION=${DURATION}s CONNS=$CONNS WORKERS=$WORKERS"
  echo "wrkargs=-t1 -c$CONNS -d${DURATION}s"
} >"$RAW/machine.txt"
node bench/report.js "$RAW" >"$RES/latest.md"
log "wrote $RES/latest.md"
cat "$RES/latest.md"
