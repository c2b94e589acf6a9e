#!/usr/bin/env bash
# scripts/test-rma.sh - FUSE reads over one-sided RMA (libfabric's tcp;ofi_rxm provider on
# loopback: real fi_read from the server's registered staging memory), root only:
#   - a server with [rma] provider "tcp;ofi_rxm" and a mount with --transport rma: files of
#     1 byte to 3 MiB read back byte-identical, the mount asks for them by two-sided fabric
#     messages, the server stages them and the mount pulls them one-sided (its counters and
#     `cfs status` show it); fsx passes on that mount;
#   - mixed clients: a --transport tcp mount of the same server reads the same bytes;
#   - fallback: a server on TCP only ([rma] transport "tcp") and a client without the
#     provider both give a working mount over TCP; --transport rma refuses to mount there,
#     with the reason;
#   - a server whose layouts lie (wrong key, a range past its memory, a wrong checksum: a
#     test fault) and a lease too short to use: every read still returns the right bytes,
#     through TCP, and the mount counts the fallbacks.
# Starts everything under a temporary directory; stops its processes by PID and cleans up.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "ok   - $1"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL - $1"; }

if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: the RMA test mounts FUSE and needs root"
  echo "0 passed, 0 failed"
  exit 0
fi
for tool in fsx fusermount3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run 'make deps'" >&2; exit 1; }
done
if ! ldconfig -p | grep -q 'libfabric\.so\.1 '; then
  echo "missing libfabric: run 'make deps'" >&2
  exit 1
fi

(cd "$ROOT" && cargo build --release -q -p cfs-dataplane -p cfs-fuse-client)
BIN=$ROOT/target/release/cfs-dataplane
CFS=$ROOT/target/release/cfs
PROV="tcp;ofi_rxm"
WORK=$(mktemp -d /tmp/cfs-rma.XXXXXX)
BASE=$((20000 + RANDOM % 20000))
SERVER_PID=""
MOUNT_PIDS=()

cleanup() {
  set +e
  stop_watchdog
  stop_pids "${MOUNT_PIDS[@]}"
  for m in "$WORK"/m*; do
    if grep -q " $m fuse" /proc/mounts; then fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; fi
  done
  # shellcheck disable=SC2086 # may be empty
  stop_pids $SERVER_PID
  rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=lib/watchdog.sh
source "$ROOT/scripts/lib/watchdog.sh"
start_watchdog test-rma
[[ -n ${KEEP_WORK:-} ]] && trap - EXIT

# start_server NAME PORT RMA-SECTION [ENV...]: a one-node server with its own store.
start_server() {
  local name=$1 port=$2 rma=$3
  shift 3
  mkdir -p "$WORK/$name"
  cat >"$WORK/$name.toml" <<CONF
data_dir = "$WORK/$name"
[[devices]]
path = "data0.img"
size = "1G"
[hugepages]
pool_mib = 16
[server]
listen = "127.0.0.1:$port"
[rma]
$rma
CONF
  "$BIN" format --config "$WORK/$name.toml" >/dev/null
  env "$@" "$BIN" run --config "$WORK/$name.toml" >>"$WORK/$name.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    grep -q "serving on" "$WORK/$name.log" 2>/dev/null && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/$name.log"; return 1; }
    sleep 0.1
  done
  return 1
}
stop_server() {
  stop_pids "${MOUNT_PIDS[@]}"
  MOUNT_PIDS=()
  for m in "$WORK"/m*; do
    if grep -q " $m fuse" /proc/mounts; then fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; fi
  done
  # shellcheck disable=SC2086
  stop_pids $SERVER_PID
  SERVER_PID=""
}

# mount_at DIR PORT [cfs mount options]: mounts and waits; its output goes to DIR.log.
mount_at() {
  local dir=$1 port=$2
  shift 2
  mkdir -p "$dir"
  "$CFS" mount "127.0.0.1:$port" "$dir" "$@" >>"$dir.log" 2>&1 &
  MOUNT_PIDS+=($!)
  for _ in $(seq 1 100); do
    grep -q " $dir fuse" /proc/mounts && return 0
    kill -0 "${MOUNT_PIDS[-1]}" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# write_files DIR: files of 1 byte to 3 MiB (a fixed seed), fsync'd; digests in $WORK/digests.
write_files() {
  python3 - "$1" "$WORK/digests" <<'PY'
import hashlib, os, random, sys
d, out = sys.argv[1], sys.argv[2]
rng = random.Random(5)
sizes = [1, 4095, 4096, 65536, 65537, 131072, 1 << 20, (1 << 20) + 1, 3 << 20] + [rng.randrange(1, 3 << 20) for _ in range(11)]
with open(out, "w") as o:
    for i, n in enumerate(sizes):
        data = rng.randbytes(n)
        with open(f"{d}/f{i}", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        o.write(f"f{i} {hashlib.sha256(data).hexdigest()}\n")
PY
}
# check_files DIR: every file reads back as written (page cache dropped first).
check_files() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  python3 - "$1" "$WORK/digests" <<'PY'
import hashlib, sys
d, digests = sys.argv[1], sys.argv[2]
bad = 0
for line in open(digests):
    name, want = line.split()
    got = hashlib.sha256(open(f"{d}/{name}", "rb").read()).hexdigest()
    if got != want:
        bad += 1
        print(f"  {name}: {got} != {want}")
sys.exit(1 if bad else 0)
PY
}
status_json() { "$CFS" status "127.0.0.1:$1" --json | awk '{ $1 = ""; print }'; }
field() { python3 -c "import json, sys; v = json.load(sys.stdin); print($1)"; }
# counters DIR: the mount's RMA counters line (printed when it stops).
counters() { grep "RMA reads:" "$1.log" | tail -1; }

# 1. An RMA server and two clients, one over RMA and one over TCP.
P1=$((BASE + 1))
start_server s1 "$P1" "transport = \"rma\"
provider = \"$PROV\"
min_bytes = 0" || { fail "the RMA server did not start"; exit 1; }
if mount_at "$WORK/m1" "$P1" --transport rma --rma-provider "$PROV" && grep -q "reads over RMA ($PROV)" "$WORK/m1.log"; then
  pass "a --transport rma mount negotiated one-sided reads ($PROV) with the server"
else
  fail "RMA mount: $(cat "$WORK/m1.log")"
  exit 1
fi
mount_at "$WORK/m2" "$P1" --transport tcp || { fail "TCP mount"; exit 1; }
write_files "$WORK/m1"
if check_files "$WORK/m1"; then
  staged=$(status_json "$P1" | field 'v["transport"]["rma"]["reads_staged"]')
  if ((staged > 0)); then
    pass "20 files of 1 byte to 3 MiB read back byte-identical over RMA ($staged reads staged by the server)"
  else
    fail "files read back but the server staged no read: $(status_json "$P1")"
  fi
else
  fail "files read over RMA differ"
fi
if check_files "$WORK/m2"; then
  pass "mixed clients: the --transport tcp mount of the same server reads the same bytes"
else
  fail "the TCP mount reads different bytes"
fi
# Several clients under load at once: a second RMA mount, eight readers over both RMA mounts
# reading every file in parallel (the server's staging pool and the client mailboxes shared).
mount_at "$WORK/m1b" "$P1" --transport rma --rma-provider "$PROV" || { fail "second RMA mount"; exit 1; }
sync
echo 3 >/proc/sys/vm/drop_caches
if python3 - "$WORK/m1" "$WORK/m1b" "$WORK/digests" <<'PY'; then
import hashlib, sys, threading
a, b, digests = sys.argv[1], sys.argv[2], sys.argv[3]
want = dict(line.split() for line in open(digests))
bad = []
def reader(k):
    d = a if k % 2 else b
    names = sorted(want)[k:] + sorted(want)[:k]
    for _ in range(3):
        for n in names:
            with open(f"{d}/{n}", "rb", buffering=0) as f:
                got = hashlib.sha256(f.read()).hexdigest()
            if got != want[n]:
                bad.append((d, n))
ts = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
print(f"  {len(bad)} wrong reads of {8 * 3 * len(want)}")
sys.exit(1 if bad else 0)
PY
  pass "two RMA mounts, eight concurrent readers, 480 whole-file reads: all byte-identical"
else
  fail "concurrent RMA readers read wrong bytes"
fi
if fsx -N 5000 -S 11 "$WORK/m1/fsx" >"$WORK/fsx.out" 2>&1 && grep -q "A-OK" "$WORK/fsx.out"; then
  pass "fsx 5000 operations on the RMA mount"
else
  fail "fsx on the RMA mount"
  tail -20 "$WORK/fsx.out"
fi
"$CFS" status "127.0.0.1:$P1" | grep "reads over" | sed 's/^/  /'
stop_pids "${MOUNT_PIDS[0]}"
c=$(counters "$WORK/m1")
echo "  m1: $c"
if [[ $c =~ ^"RMA reads: "([0-9]+)" ".*" "([0-9]+)" requests as fabric messages, "([0-9]+)" fell back" ]] &&
  ((BASH_REMATCH[1] > 0 && BASH_REMATCH[2] > 0 && BASH_REMATCH[3] == 0)); then
  pass "the RMA mount read ${BASH_REMATCH[1]} times one-sided, asked ${BASH_REMATCH[2]} times by two-sided fabric messages (no TCP), never fell back"
else
  fail "RMA mount counters: $c"
fi
stop_server
# SIGTERM stops it in order (libfabric's exit-on-signal handlers are undone; nothing the RMA
# path holds keeps the engine from its final checkpoint).
if grep -q "^stopping:" "$WORK/s1.log" && ! grep -q "^Error" "$WORK/s1.log"; then
  pass "the RMA server stopped cleanly on SIGTERM"
else
  fail "the RMA server did not stop cleanly: $(grep -A2 "^stopping:\|^Error" "$WORK/s1.log" | head -5)"
fi

# 2. Fallback: a server on TCP only, a client without the provider.
P2=$((BASE + 2))
start_server s2 "$P2" 'transport = "tcp"' || { fail "the TCP-only server did not start"; exit 1; }
write_ok=0
if mount_at "$WORK/m3" "$P2" --rma-provider "$PROV" && grep -q "reads over TCP" "$WORK/m3.log"; then
  write_files "$WORK/m3" && check_files "$WORK/m3" && write_ok=1
fi
if ((write_ok)) && "$CFS" status "127.0.0.1:$P2" | grep -q "reads over TCP only"; then
  pass "server without RMA: the mount fell back to TCP by itself and reads right; cfs status says TCP only"
else
  fail "fallback to a TCP-only server: $(cat "$WORK/m3.log")"
fi
if out=$("$CFS" mount "127.0.0.1:$P2" "$WORK/m4" --transport rma --rma-provider "$PROV" 2>&1); then
  fail "--transport rma mounted a TCP-only server"
else
  if grep -q "does not read over RMA" <<<"$out"; then pass "--transport rma refuses a TCP-only server: $(grep -m1 "^Error" <<<"$out")"; else fail "refusal unclear: $out"; fi
fi
stop_server
start_server s3 "$((BASE + 3))" "provider = \"$PROV\"
min_bytes = 0" || { fail "server s3 did not start"; exit 1; }
if mount_at "$WORK/m5" "$((BASE + 3))" --rma-provider no-such-provider && grep -q "reads over TCP (no RMA provider" "$WORK/m5.log" &&
  write_files "$WORK/m5" && check_files "$WORK/m5"; then
  pass "client without the provider: mounted over TCP by itself, reads right"
else
  fail "client without the provider: $(cat "$WORK/m5.log")"
fi
if out=$("$CFS" mount "127.0.0.1:$((BASE + 3))" "$WORK/m6" --transport rma --rma-provider no-such-provider 2>&1); then
  fail "--transport rma mounted without the provider"
else
  if grep -q "cannot be used here" <<<"$out"; then pass "--transport rma without the provider refuses to mount: $(grep -m1 "^Error" <<<"$out")"; else fail "refusal unclear: $out"; fi
fi
stop_server

# 3. Layouts that lie, and leases too short to use: right bytes anyway, through TCP.
n=4
for fault in key range crc lease; do
  n=$((n + 1))
  port=$((BASE + n))
  extra=""
  [[ $fault == lease ]] && extra="lease_ms = 1"
  start_server "f$fault" "$port" "provider = \"$PROV\"
min_bytes = 0
$extra" CFS_TEST_RMA_FAULT="$fault" || { fail "server with fault $fault did not start"; continue; }
  if mount_at "$WORK/m$n" "$port" --transport rma --rma-provider "$PROV" && write_files "$WORK/m$n" && check_files "$WORK/m$n"; then
    stop_pids "${MOUNT_PIDS[@]}"
    MOUNT_PIDS=()
    c=$(counters "$WORK/m$n")
    if [[ $c =~ " "([0-9]+)" fell back" ]] && ((BASH_REMATCH[1] > 0)); then
      pass "fault '$fault': every file reads back right; ${BASH_REMATCH[1]} RMA reads refused and read through TCP"
    else
      fail "fault '$fault': no fallback counted: $c"
    fi
  else
    fail "fault '$fault': wrong data or no mount: $(tail -3 "$WORK/m$n.log")"
  fi
  stop_server
done

echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
