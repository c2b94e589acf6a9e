#!/usr/bin/env bash
# scripts/test-partition.sh - a three-node (NODES=5: five-node) cluster in network namespaces
# (root only):
#   each cfs-dataplane runs in its own network namespace, all joined by veth pairs to a bridge in
#   a hub namespace; a client namespace mounts them all. The leader's link is then taken down
#   (with five nodes, one more node's too: a minority of two): the majority elects a leader and
#   keeps accepting writes; a client inside the cut-off leader's namespace gets EIO (the minority
#   refuses writes). On heal the cut-off nodes catch up, their stale chunk copies are repaired,
#   and everything written during the partition reads back.
# Uses only addresses inside the namespaces it creates (10.77.0.0/24); deletes them on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "ok   - $1"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL - $1"; }

if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: network namespaces and FUSE need root"
  echo "0 passed, 0 failed"
  exit 0
fi
for t in ip nsenter fusermount3; do
  command -v "$t" >/dev/null || { echo "missing $t: run 'make deps'" >&2; exit 1; }
done

(cd "$ROOT" && cargo build --release -q -p cfs-dataplane -p cfs-fuse-client)
BIN=$ROOT/target/release/cfs-dataplane
CFS=$ROOT/target/release/cfs
WORK=$(mktemp -d /tmp/cfs-partition.XXXXXX)
N=${NODES:-3}
[[ $N == 3 || $N == 5 ]] || { echo "NODES must be 3 or 5" >&2; exit 1; }
TAG=cfsp$$
HUB=$TAG-hub
CL=$TAG-cl
declare -A PIDS=()
MOUNT_PIDS=()

ns() { echo "$TAG-n$1"; }
cleanup() {
  set +e
  stop_watchdog
  stop_pids "${MOUNT_PIDS[@]}"
  for m in "$WORK/mnt" "$WORK/mnt-minority"; do
    if grep -q " $m fuse" /proc/mounts; then fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; fi
  done
  stop_pids "${PIDS[@]}"
  for ((n = 1; n <= N; n++)); do ip netns del "$(ns "$n")" 2>/dev/null; done
  ip netns del "$CL" 2>/dev/null
  ip netns del "$HUB" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=lib/watchdog.sh
source "$ROOT/scripts/lib/watchdog.sh"
start_watchdog test-partition

# Namespaces: a hub with a bridge, three nodes and a client, each on a veth to the bridge.
ip netns add "$HUB"
ip -n "$HUB" link add br0 type bridge
ip -n "$HUB" link set br0 up
attach() { # attach NAMESPACE ADDRESS HUB_SIDE_NAME
  ip netns add "$1"
  ip link add eth0 netns "$1" type veth peer name "$3" netns "$HUB"
  ip -n "$1" addr add "$2/24" dev eth0
  ip -n "$1" link set eth0 up
  ip -n "$1" link set lo up
  ip -n "$HUB" link set "$3" master br0
  ip -n "$HUB" link set "$3" up
}
for ((n = 1; n <= N; n++)); do attach "$(ns "$n")" "10.77.0.$n" "h$n"; done
attach "$CL" 10.77.0.100 hcl

ADDRS=""
PEERS=""
for ((n = 1; n <= N; n++)); do
  ADDRS+="${ADDRS:+,}10.77.0.$n:7411"
  PEERS+="${PEERS:+, }$n = \"10.77.0.$n:7411\""
done
for ((n = 1; n <= N; n++)); do
  mkdir -p "$WORK/n$n"
  cat >"$WORK/n$n.toml" <<CONF
data_dir = "$WORK/n$n"
[[devices]]
path = "data0.img"
size = "256M"
[hugepages]
pool_mib = 16
[reactors]
cores = [$(((n - 1) % 2))]
[server]
listen = "0.0.0.0:7411"
[cluster]
node_id = $n
peers = { $PEERS }
# Every node votes and holds every chunk: a majority of the nodes is then a majority of the
# voters and of every chunk's holders, whichever nodes are cut off.
meta_replicas = $N
replicas = $N
tick_ms = 50
propose_timeout_ms = 3000
replica_timeout_ms = 2000
CONF
  "$BIN" format --config "$WORK/n$n.toml" >/dev/null 2>&1
  nsenter --net="/run/netns/$(ns "$n")" "$BIN" run --config "$WORK/n$n.toml" >>"$WORK/n$n.log" 2>&1 &
  PIDS[$n]=$!
done
for ((n = 1; n <= N; n++)); do
  for _ in $(seq 1 100); do grep -q "serving on" "$WORK/n$n.log" 2>/dev/null && break; sleep 0.1; done
done

status() { nsenter --net="/run/netns/$CL" "$CFS" status "$ADDRS" 2>&1 || true; }
leader_of() { awk 'NR > 1 && $2 == "leader" {print $3}' <<<"$1" | head -1; }
L=""
for _ in $(seq 1 100); do
  L=$(leader_of "$(status)")
  [[ -n $L ]] && break
  sleep 0.1
done
[[ -n $L ]] || { fail "no leader elected"; exit 1; }
pass "$N nodes in separate network namespaces formed a group (leader: node $L)"

mount_in() { # mount_in NAMESPACE ADDRS DIR
  mkdir -p "$3"
  nsenter --net="/run/netns/$1" "$CFS" mount "$2" "$3" --timeout "${4:-5}" >>"$WORK/mount.log" 2>&1 &
  MOUNT_PIDS+=($!)
  for _ in $(seq 1 100); do grep -q " $3 fuse" /proc/mounts && return 0; sleep 0.1; done
  cat "$WORK/mount.log"
  return 1
}
mount_in "$CL" "$ADDRS" "$WORK/mnt"
head -c 2000000 /dev/urandom >"$WORK/before"
cp "$WORK/before" "$WORK/mnt/before"

# Cut the leader off (with five nodes, one more node too: a minority of two).
CUT=$L
if ((N == 5)); then
  for ((n = 1; n <= N; n++)); do [[ $n != "$L" ]] && { CUT="$L $n"; break; }; done
fi
for n in $CUT; do ip -n "$HUB" link set "h$n" down; done
t0=$(date +%s.%N)
ok=0
for _ in $(seq 1 60); do
  if mkdir "$WORK/mnt/during" 2>>"$WORK/attempts"; then ok=1; break; fi
  date +%s.%N >>"$WORK/attempts"
  sleep 0.5
done
t1=$(date +%s.%N)
if ((ok)); then
  [[ -s $WORK/attempts ]] && sed 's/^/  attempt: /' "$WORK/attempts" | tail -n 6
  pass "majority side took a write $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s after node(s) $CUT (the leader first) were cut off"
else
  fail "majority side did not accept writes"
fi
head -c 3000000 /dev/urandom >"$WORK/during-data"
if cp "$WORK/during-data" "$WORK/mnt/during/data" 2>"$WORK/cp.err" && cmp -s "$WORK/during-data" "$WORK/mnt/during/data"; then
  pass "data written during the partition reads back"
else
  fail "data written during the partition: $(cat "$WORK/cp.err")"
  for ((n = 1; n <= N; n++)); do sed 's/\x1b\[[0-9;]*m//g' "$WORK/n$n.log" | grep -v hugepages | tail -n 3 | sed "s/^/  n$n: /"; done
fi

# The cut-off node, asked directly from inside its namespace, refuses writes.
mount_in "$(ns "$L")" "127.0.0.1:7411" "$WORK/mnt-minority"
if timeout 60 mkdir "$WORK/mnt-minority/minority-write" 2>"$WORK/minority.err"; then
  fail "the cut-off node accepted a write"
else
  pass "the cut-off node refuses writes ($(tr -d '\n' <"$WORK/minority.err" | sed 's/.*: //'))"
fi

# Heal: the cut-off nodes catch up and their stale chunk copies are repaired.
for n in $CUT; do ip -n "$HUB" link set "h$n" up; done
caught=0
for _ in $(seq 1 300); do
  st=$(status)
  applied=$(awk 'NF == 0 {exit} NR > 1 && $2 != "unreachable:" {print $5}' <<<"$st" | sort -u | wc -l)
  stale=$(awk 'NR > 1 && $2 == "leader" {print $NF}' <<<"$st")
  members=$(awk 'NR > 1 && ($2 == "leader" || $2 == "follower")' <<<"$st" | wc -l)
  if ((members == N && applied == 1)) && [[ $stale == 0 ]]; then caught=1; break; fi
  sleep 0.2
done
echo "$st" | sed 's/^/  /'
if ((caught)); then
  pass "after the heal node(s) $CUT caught up (same applied index everywhere) and no stale copy is left"
else
  fail "node(s) $CUT did not catch up after the heal"
fi
if cmp -s "$WORK/before" "$WORK/mnt/before" && cmp -s "$WORK/during-data" "$WORK/mnt/during/data"; then
  pass "everything written before and during the partition reads back after the heal"
else
  fail "data after the heal"
fi

echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
