#!/usr/bin/env bash
# scripts/test-tier.sh - the object tier through a real FUSE mount, against two independent
# real S3 servers (s3s-fs and moto_server, started here on loopback), root only:
#   - flush, evict, read back: files written through the mount are flushed (`cfs tier flush
#     --wait`) into small blobs, evicted from flash, and read back byte-identical (ranged GETs,
#     checked, repopulating flash); a pinned file stays on flash; the store saw only PUT, GET
#     with a Range, and DELETE under the cluster's prefix (a recording proxy), never a LIST;
#     a 4 KiB read of an evicted file is answered by one GET of the 1 MiB block around it
#     (after the blob's table) and its chunk comes back to flash in the background;
#   - compaction: overwrites leave blobs mostly dead; they are rewritten and exactly the blobs
#     nothing points at any more are DELETEd (what the store still holds = PUT - DELETE, and
#     all of it is referenced: every file reads back after everything is evicted again);
#   - the store killed in the middle of a flush and restarted: the flush completes by itself,
#     nothing is lost;
#   - an outage: writes go on into flash until the reserve, then ENOSPC with a clear log line
#     (never lost data); when the store is back, flushing resumes and writes are accepted;
#   - a proxy adding 200 ms and failing or truncating 5% of responses: tiering completes and
#     every byte reads back;
#   - against moto_server too: flush, evict, read back, compaction (checked by listing moto
#     directly), and the slow, flaky proxy (a kill and restart applies to s3s-fs only: moto
#     keeps its objects in memory, so a restarted moto is an empty store).
# Starts everything under a temporary directory; stops its processes by PID and cleans up.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "ok   - $1"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL - $1"; }

if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: the tier test mounts FUSE and needs root"
  echo "0 passed, 0 failed"
  exit 0
fi
export PATH="$HOME/.cargo/bin:$PATH"
for tool in fusermount3 s3s-fs moto_server; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run 'scripts/deps test'" >&2; exit 1; }
done

(cd "$ROOT" && cargo build --release -q -p cfs-dataplane -p cfs-fuse-client -p cfs-objtier)
BIN=$ROOT/target/release/cfs-dataplane
CFS=$ROOT/target/release/cfs
PROXY=$ROOT/target/release/cfs-s3proxy
WORK=$(mktemp -d /tmp/cfs-tier.XXXXXX)
BASE=$((20000 + RANDOM % 20000))
KEY=cfstest
SECRET=cfstestsecret
BUCKET=tier
SERVER_PID=""
MOUNT_PIDS=()
S3_PID=""
PROXY_PID=""
NODE_PIDS=()

cleanup() {
  set +e
  stop_watchdog
  stop_pids "${MOUNT_PIDS[@]}"
  for m in "$WORK"/m*; do
    if grep -q " $m fuse" /proc/mounts; then fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; fi
  done
  # shellcheck disable=SC2086 # may be empty
  stop_pids $SERVER_PID $PROXY_PID $S3_PID "${NODE_PIDS[@]}"
  rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=lib/watchdog.sh
source "$ROOT/scripts/lib/watchdog.sh"
start_watchdog test-tier
[[ -n ${KEEP_WORK:-} ]] && trap - EXIT

wait_port() { # wait_port PORT: until something listens there
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
# start_s3s PORT DIR: s3s-fs over DIR (bucket directory made), pid in S3_PID.
start_s3s() {
  mkdir -p "$2/$BUCKET"
  s3s-fs --host 127.0.0.1 --port "$1" --access-key "$KEY" --secret-key "$SECRET" "$2" \
    >>"$WORK/s3s.log" 2>&1 &
  S3_PID=$!
  wait_port "$1"
}
# start_moto PORT: moto_server with the bucket made, pid in S3_PID.
start_moto() {
  moto_server -H 127.0.0.1 -p "$1" >>"$WORK/moto.log" 2>&1 &
  S3_PID=$!
  wait_port "$1"
  python3 - "$1" "$BUCKET" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
c.request("PUT", "/" + sys.argv[2])
r = c.getresponse()
assert r.status == 200, r.status
PY
}
# start_proxy PORT UPSTREAM [options]: the recording (and faulty) proxy, log $WORK/requests.
start_proxy() {
  local port=$1 up=$2
  shift 2
  "$PROXY" "$port" "$up" "$WORK/requests" "$@" >>"$WORK/proxy.log" 2>&1 &
  PROXY_PID=$!
  wait_port "$port"
}
# start_server NAME PORT S3PORT [TIER OPTIONS...]: a one-node server tiering to the store at
# S3PORT (1 MiB blobs, nothing old enough to flush by itself, everything flushed evicted).
start_server() {
  local name=$1 port=$2 s3=$3 d
  shift 3
  local opts=("$@")
  for d in "blob_kib = 1024" "min_age_ms = 3600000" "evict_above_pct = 0" "evict_to_pct = 0" \
    "scan_interval_ms = 300" "deadline_ms = 20000" "request_timeout_ms = 5000"; do
    printf '%s\n' "$@" | grep -q "^${d%% =*} =" || opts+=("$d")
  done
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
transport = "tcp"
[tier]
endpoint = "http://127.0.0.1:$s3"
bucket = "$BUCKET"
prefix = "t1"
access_key_id = "$KEY"
secret_access_key = "$SECRET"
$(printf '%s\n' "${opts[@]}")
CONF
  [[ -e "$WORK/$name/data0.img" ]] || "$BIN" format --config "$WORK/$name.toml" >/dev/null
  "$BIN" run --config "$WORK/$name.toml" >>"$WORK/$name.log" 2>&1 &
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
mount_at() { # mount_at DIR PORT
  mkdir -p "$1"
  "$CFS" mount "127.0.0.1:$2" "$1" --transport tcp >>"$1.log" 2>&1 &
  MOUNT_PIDS+=($!)
  for _ in $(seq 1 100); do
    grep -q " $1 fuse" /proc/mounts && return 0
    kill -0 "${MOUNT_PIDS[-1]}" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
# write_files DIR SEED [PREFIX [COUNT]]: files of 1 byte to 3 MiB, fsync'd; digests in
# $WORK/digests.
write_files() {
  python3 - "$1" "$WORK/digests" "$2" "${3:-f}" "${4:-12}" <<'PY'
import hashlib, os, random, sys
d, out, seed, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
rng = random.Random(seed)
sizes = [1, 4096, 65537, 1 << 20, (1 << 20) + 1, 3 << 20] + [rng.randrange(1, 2 << 20) for _ in range(6)]
old = {}
if os.path.exists(out):
    for line in open(out):
        n, h = line.split()
        old[n] = h
for i, n in enumerate(sizes[:count]):
    data = rng.randbytes(n)
    name = f"{prefix}{i}"
    with open(f"{d}/{name}", "wb") as f:
        view = memoryview(data)
        while view:
            view = view[os.write(f.fileno(), view):]
        os.fsync(f.fileno())
    old[name] = hashlib.sha256(data).hexdigest()
with open(out, "w") as o:
    for n, h in sorted(old.items()):
        o.write(f"{n} {h}\n")
PY
}
# check_files DIR: every file in $WORK/digests reads back as written (page cache dropped).
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
        print(f"{name}: content differs", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}
# stat_of PORT KEY: a number from the node's tier status.
stat_of() {
  "$CFS" tier status "127.0.0.1:$1" --json | python3 -c "
import json, sys
for line in sys.stdin:
    v = json.loads(line.split(' ', 1)[1])
    k = '$2'
    print(v['stats'][k] if k in v['stats'] else v['store'][k])
    break"
}
# wait_stat PORT KEY OP VALUE: until the status number compares so (up to 30 s).
wait_stat() {
  for _ in $(seq 1 150); do
    local v
    v=$(stat_of "$1" "$2" 2>/dev/null || echo -1)
    python3 -c "import sys; sys.exit(0 if $v $3 $4 else 1)" && return 0
    sleep 0.2
  done
  return 1
}
# requests_ok: every request the store saw was a PUT, a ranged GET or a DELETE of a blob key.
requests_ok() {
  python3 - "$WORK/requests" "$BUCKET" <<'PY'
import re, sys
bad = [l.strip() for l in open(sys.argv[1]) if not re.fullmatch(
    r"(PUT /%s/t1/blobs/[0-9a-f]{32} -|GET /%s/t1/blobs/[0-9a-f]{32} bytes=\d+-\d+|DELETE /%s/t1/blobs/[0-9a-f]{32} -)( FAILED| DOWN| CUT)?"
    % ((sys.argv[2],) * 3), l.strip())]
for l in bad[:5]:
    print("unexpected request:", l, file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}
count_req() { grep -E "^$1 " "$WORK/requests" | grep -vcE "FAILED|DOWN|CUT" || true; }

# --- s3s-fs: flush, evict, read back; pin; compaction ------------------------------------
S3=$((BASE)); PX=$((BASE + 1)); FS=$((BASE + 2))
STORE=s3s
STORE_PORT=$S3
start_s3s "$S3" "$WORK/s3" || { echo "s3s-fs does not start"; cat "$WORK/s3s.log"; exit 1; }
start_proxy "$PX" "$S3"
start_server n1 "$FS" "$PX"
M=$WORK/m1
mount_at "$M" "$FS"
write_files "$M" 1
"$CFS" tier pin "$M/f5" >/dev/null
if "$CFS" tier flush "127.0.0.1:$FS" --wait --timeout 120 >"$WORK/flush1.out" 2>&1; then
  pass "cfs tier flush --wait finishes ($(tail -1 "$WORK/flush1.out"))"
else
  fail "cfs tier flush --wait: $(tail -3 "$WORK/flush1.out")"
fi
PUTS=$(count_req PUT)
total=$(python3 -c "import os; print(sum(os.path.getsize('$M/'+l.split()[0]) for l in open('$WORK/digests')))")
pinned=$(stat -c %s "$M/f5")
if wait_stat "$FS" evicted_bytes == "$((total - pinned))"; then
  pass "$PUTS blobs PUT; everything but the pinned file evicted ($((total - pinned)) bytes)"
else
  fail "evicted $(stat_of "$FS" evicted_bytes) bytes, expected $((total - pinned)) (total $total, pinned $pinned)"
fi
# A small read of an evicted file: answered by a ranged GET of the 1 MiB block around it
# (after the blob's table), checked; the whole chunk comes back to flash in the background.
restores0=$(stat_of "$FS" restores)
echo 3 >/proc/sys/vm/drop_caches
if python3 - "$M" "$WORK/digests" "$WORK/requests" <<'PY' >"$WORK/piece" 2>&1; then
import os, re, sys
d, digests, log = sys.argv[1:4]
names = [l.split()[0] for l in open(digests)]
name = max((n for n in names if n != "f5"), key=lambda n: os.path.getsize(f"{d}/{n}"))
size = os.path.getsize(f"{d}/{name}")
off = size // 2
n0 = sum(1 for _ in open(log))
with open(f"{d}/{name}", "rb") as f:
    f.seek(off)
    piece = f.read(4096)
assert len(piece) == min(4096, size - off), len(piece)
ranges = []
for l in list(open(log))[n0:]:
    m = re.match(r"GET \S+ bytes=(\d+)-(\d+)$", l.strip())
    if m and int(m.group(1)) != 0:  # not the table's GETs (from byte 0)
        ranges.append(int(m.group(2)) - int(m.group(1)) + 1)
if not ranges or ranges[0] > 1 << 20:
    print(f"the read of 4 KiB of {name} ({size} bytes) fetched {ranges}")
    sys.exit(1)
# The piece is the file's bytes there (the whole file checked against its digest).
import hashlib
whole = open(f"{d}/{name}", "rb").read()
want = dict(l.split() for l in open(digests))[name]
assert hashlib.sha256(whole).hexdigest() == want, "the file differs"
assert whole[off:off + 4096] == piece, "the piece read from the store differs"
print(f"4 KiB of {name} ({size} bytes) at {off}: a GET of {ranges[0]} bytes, the right bytes")
PY
  pass "a small read of an evicted file: $(cat "$WORK/piece")"
else
  fail "a small read of an evicted file: $(cat "$WORK/piece")"
fi
if wait_stat "$FS" restores ">" "$restores0" && [[ $(stat_of "$FS" store_reads) -gt 0 ]]; then
  pass "the chunk read from the store is back on flash ($(stat_of "$FS" store_reads) reads by blocks, $(stat_of "$FS" store_read_bytes) bytes)"
else
  fail "no background restore after a read from the store (restores $(stat_of "$FS" restores), store reads $(stat_of "$FS" store_reads))"
fi
"$CFS" tier status "127.0.0.1:$FS" >"$WORK/status1" 2>&1 || true
grep -q "on object store" "$WORK/status1" && pass "cfs tier status: $(grep 'on object store' "$WORK/status1")" || fail "cfs tier status: $(cat "$WORK/status1")"
if check_files "$M"; then
  pass "every file reads back byte-identical from the object store"
else
  fail "files read back from the object store differ"
fi
GETS=$(count_req GET)
restores=$(stat_of "$FS" restores)
[[ $GETS -gt 0 && $restores -gt 0 ]] && pass "read back by $GETS ranged GETs, $restores chunks repopulated on flash" || fail "GETs $GETS restores $restores"
requests_ok && pass "the store saw only PUT, ranged GET and DELETE of blob keys" || fail "the store saw other requests"

# held_blobs: the blob ids the store holds now, one a line. The test looks for itself (the
# s3s-fs directory, or a LIST sent straight to moto_server, not through the proxy): ClaudeFS
# never lists.
held_blobs() {
  if [[ $STORE == s3s ]]; then
    find "$WORK/s3/$BUCKET/t1/blobs" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9a-f]{32}' -printf '%f\n'
  else
    python3 - "$STORE_PORT" "$BUCKET" <<'PY'
import http.client, re, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
c.request("GET", f"/{sys.argv[2]}?list-type=2&prefix=t1/blobs/&max-keys=1000")
body = c.getresponse().read().decode()
assert "<IsTruncated>false</IsTruncated>" in body, "listing truncated"
for k in re.findall(r"<Key>t1/blobs/([0-9a-f]{32})</Key>", body):
    print(k)
PY
  fi
}

# Compaction (compaction_test LABEL MOUNT PORT): 16 files of 200 KiB share blobs four or five
# to a blob; overwriting three in four leaves those blobs below half live: they are rewritten,
# and every blob left with nothing live is DELETEd, and nothing else.
small_files() { # small_files DIR SEED STEP: files s0..s15 whose index is not a multiple of STEP
  python3 - "$1" "$WORK/digests" "$2" "$3" <<'PY'
import hashlib, os, random, sys
d, out, seed, step = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
old = dict(l.split() for l in open(out))
for i in range(16):
    data = rng.randbytes(200 << 10)
    if step and i % step == 0:
        continue
    with open(f"{d}/s{i}", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    old[f"s{i}"] = hashlib.sha256(data).hexdigest()
with open(out, "w") as o:
    o.writelines(f"{n} {h}\n" for n, h in sorted(old.items()))
PY
}
compaction_test() {
  local label=$1 mnt=$2 port=$3
  small_files "$mnt" 6 0
  "$CFS" tier flush "127.0.0.1:$port" --wait --timeout 120 >/dev/null 2>&1 || true
  small_files "$mnt" 7 4
  "$CFS" tier flush "127.0.0.1:$port" --wait --timeout 120 >/dev/null 2>&1 || true
  # Rounds go on: wait for the deletions to settle (no blob being deleted, none dead).
  wait_stat "$port" blobs_deleting == 0 || true
  sleep 1
  held_blobs >"$WORK/held"
  if python3 - "$WORK/requests" "$WORK/held" <<'PY' >"$WORK/compaction" 2>&1; then
import re, sys
puts, dels = [], []
for l in open(sys.argv[1]):
    m = re.match(r"(PUT|DELETE) /\S+/blobs/([0-9a-f]{32}) - *$", l.strip())
    if m:
        (puts if m.group(1) == "PUT" else dels).append(m.group(2))
held = set(l.strip() for l in open(sys.argv[2]) if l.strip())
problems = []
if not dels:
    problems.append("no DELETE")
if len(set(dels)) != len(dels):
    problems.append("a blob DELETEd twice")
if set(dels) - set(puts):
    problems.append("DELETE of a blob never PUT")
if held != set(puts) - set(dels):
    problems.append(f"store holds {len(held)} blobs, PUT - DELETE is {len(set(puts) - set(dels))}")
print("; ".join(problems) if problems else f"{len(puts)} PUTs, {len(dels)} DELETEs, the store holds exactly PUT - DELETE ({len(held)} blobs)")
sys.exit(1 if problems else 0)
PY
    pass "${label}compaction: $(cat "$WORK/compaction")"
  else
    fail "${label}compaction: $(cat "$WORK/compaction")"
  fi
  local held indexed compactions
  held=$(wc -l <"$WORK/held")
  indexed=$(stat_of "$port" blobs)
  compactions=$(stat_of "$port" compactions)
  [[ $held -eq $indexed && $compactions -gt 0 ]] && pass "${label}$compactions blobs rewritten; the index names every blob the store holds ($indexed)" || fail "${label}store holds $held blobs, index $indexed, compactions $compactions"
  if check_files "$mnt"; then
    pass "${label}after compaction every file reads back byte-identical (blobs DELETEd were unreferenced)"
  else
    fail "${label}files differ after compaction"
  fi
}
compaction_test "" "$M" "$FS"

# A blob lost on the store (deleted behind our back): the read fails with EIO, not with wrong
# data, and the status reports it loudly (and exits non-zero).
head -c 300000 /dev/urandom >"$M/lost"
sync
"$CFS" tier flush "127.0.0.1:$FS" --wait --timeout 60 >/dev/null 2>&1 || true
wait_stat "$FS" flash_bytes == 0 || true
newest=$(ls -t "$WORK/s3/$BUCKET/t1/blobs" | head -1)
rm -f "$WORK/s3/$BUCKET/t1/blobs/$newest"
sync
echo 3 >/proc/sys/vm/drop_caches
if cat "$M/lost" >/dev/null 2>"$WORK/lost.err"; then
  fail "a file whose blob is gone read without an error"
elif grep -q "Input/output error" "$WORK/lost.err"; then
  if ! "$CFS" tier status "127.0.0.1:$FS" >"$WORK/status-lost" 2>&1 && grep -q "MISSING" "$WORK/status-lost"; then
    pass "a missing blob: EIO for its file, and cfs tier status says: $(grep MISSING "$WORK/status-lost" | cut -c1-100)"
  else
    fail "a missing blob is not reported: $(cat "$WORK/status-lost")"
  fi
else
  fail "a missing blob gave: $(cat "$WORK/lost.err")"
fi
rm -f "$M/lost"

# The store killed in the middle of a flush (each request slowed to 300 ms so it is caught
# in the act) and started again: the flush completes by itself, nothing is lost.
stop_pids "$PROXY_PID"
start_proxy "$PX" "$S3" --delay-ms 300
write_files "$M" 3 g
puts0=$(count_req PUT)
"$CFS" tier flush "127.0.0.1:$FS" --wait --timeout 180 >"$WORK/flush3.out" 2>&1 &
FLUSH_PID=$!
for _ in $(seq 1 100); do
  [[ $(count_req PUT) -gt $puts0 ]] && break
  sleep 0.1
done
kill -9 "$S3_PID"
wait "$S3_PID" 2>/dev/null || true
if wait_stat "$FS" failing == True; then
  pass "store killed after $(($(count_req PUT) - puts0)) PUT(s) of the flush: status shows it down"
else
  fail "store killed, but status does not show it down"
fi
sleep 2
kill -0 "$FLUSH_PID" 2>/dev/null && pass "the flush waits while the store is down" || fail "the flush ended while the store was down: $(cat "$WORK/flush3.out")"
start_s3s "$S3" "$WORK/s3"
if wait "$FLUSH_PID"; then
  pass "store restarted: the flush completed by itself ($(tail -1 "$WORK/flush3.out"))"
else
  fail "flush after the restart: $(tail -3 "$WORK/flush3.out")"
fi
wait_stat "$FS" unflushed_bytes == 0 || true
if check_files "$M"; then
  pass "nothing lost: every file reads back byte-identical"
else
  fail "files differ after the store's restart"
fi

# The server killed (SIGKILL) in the middle of a flush: every upload is recorded before it
# starts, so after the restart an upload that was never recorded is DELETEd; the store then
# holds exactly the blobs the index names, and every file reads back.
write_files "$M" 10 k
puts0=$(count_req PUT)
"$CFS" tier flush "127.0.0.1:$FS" >/dev/null 2>&1
for _ in $(seq 1 100); do
  [[ $(count_req PUT) -gt $((puts0 + 1)) ]] && break
  sleep 0.1
done
kill -9 "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""
stop_pids "${MOUNT_PIDS[@]}"
MOUNT_PIDS=()
grep -q " $M fuse" /proc/mounts && { fusermount3 -u "$M" 2>/dev/null || umount -l "$M"; }
sleep 1
start_server n1 "$FS" "$PX"
mount_at "$M" "$FS"
"$CFS" tier flush "127.0.0.1:$FS" --wait --timeout 180 >/dev/null 2>&1 || true
"$CFS" tier flush "127.0.0.1:$FS" --wait --timeout 180 >/dev/null 2>&1 || true
held=$(held_blobs | wc -l)
indexed=$(stat_of "$FS" blobs)
abandoned=$(grep -c "its upload was never recorded" "$WORK/n1.log" || true)
if [[ $held -eq $indexed ]]; then
  pass "server killed mid-flush: after the restart the store holds exactly the $indexed blobs the index names ($abandoned unrecorded upload(s) DELETEd)"
else
  fail "server killed mid-flush: the store holds $held blobs, the index names $indexed"
fi
if check_files "$M"; then
  pass "server killed mid-flush: every file reads back byte-identical"
else
  fail "server killed mid-flush: files differ"
fi

# An outage: with flushing running continuously (min_age 500 ms) and a reserve of 4 MiB (+4
# MiB of slack), writes go on into flash, then slow down, then get ENOSPC; nothing written
# is lost, and when the store returns flushing resumes and writes are accepted again.
stop_server
stop_pids "$PROXY_PID"
start_proxy "$PX" "$S3"
start_server n1 "$FS" "$PX" "min_age_ms = 500" "reserve_mib = 4" "reserve_slack_mib = 4"
mount_at "$M" "$FS"
wait_stat "$FS" unflushed_bytes == 0 || true
kill -9 "$S3_PID"
wait "$S3_PID" 2>/dev/null || true
# The first write after the kill is flushed half a second later; that PUT fails: the store
# is known down from then on (as `cfs tier status` shows).
head -c 1048576 /dev/urandom >"$WORK/o-first"
cp "$WORK/o-first" "$M/o-first" && sync
echo "o-first $(sha256sum <"$WORK/o-first" | cut -d' ' -f1)" >>"$WORK/digests"
wait_stat "$FS" failing == True || fail "the store's outage is not seen"
python3 - "$M" "$WORK/digests" <<'PY' >"$WORK/outage" 2>&1 && pass "outage: $(cat "$WORK/outage")" || fail "outage: $(cat "$WORK/outage")"
import errno, hashlib, os, random, sys, time
d, out = sys.argv[1], sys.argv[2]
rng = random.Random(9)
ok = 0
start = time.time()
for i in range(40):
    data = rng.randbytes(1 << 20)
    try:
        with open(f"{d}/o{i}", "wb") as f:
            view = memoryview(data)
            while view:
                view = view[os.write(f.fileno(), view):]
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"{ok} MiB more accepted while the store was down, then ENOSPC after {time.time() - start:.1f} s")
        sys.exit(0 if ok >= 4 else 1)
    with open(out, "a") as o:
        o.write(f"o{i} {hashlib.sha256(data).hexdigest()}\n")
    ok += 1
print(f"{ok} MiB accepted and never ENOSPC")
sys.exit(1)
PY
grep -q "refusing new data with ENOSPC" "$WORK/n1.log" && pass "the server says why: $(grep -m1 -o 'object store unreachable.*' "$WORK/n1.log" | cut -c1-150)" || fail "no log line about ENOSPC"
start_s3s "$S3" "$WORK/s3"
if wait_stat "$FS" unflushed_bytes == 0; then
  pass "store back: flushing resumed by itself and caught up"
else
  fail "store back, but $(stat_of "$FS" unflushed_bytes) bytes still unflushed"
fi
if head -c 1048576 /dev/urandom >"$M/after" && sync; then
  pass "writes accepted again"
else
  fail "writes still refused after the store came back"
fi
if check_files "$M"; then
  pass "nothing acknowledged was lost in the outage"
else
  fail "files differ after the outage"
fi

# A sequential read of an evicted file (the kernel asks 128 KiB at a time) while its chunk is
# brought back to flash in the background: the right bytes, small reads answered from the
# block cache, each block fetched about once (reads and the restore share it; without the
# cache every small read fetches its whole 1 MiB block).
python3 - "$M/seq" <<'PY'
import os, random, sys
data = random.Random(7).randbytes(20 << 20)
with open(sys.argv[1], "wb") as f:
    view = memoryview(data)
    while view:
        view = view[os.write(f.fileno(), view):]
    os.fsync(f.fileno())
PY
SEQ_SUM=$(sha256sum "$M/seq" | cut -d' ' -f1)
"$CFS" tier flush "127.0.0.1:$FS" --wait --timeout 120 >/dev/null 2>&1 || true
seq_ok=""
for _ in $(seq 1 20); do
  fetched0=$(( $(stat_of "$FS" store_read_bytes) + $(stat_of "$FS" restore_bytes) ))
  cached0=$(stat_of "$FS" cache_reads)
  restores0=$(stat_of "$FS" restores)
  echo 3 >/proc/sys/vm/drop_caches
  got=$(sha256sum "$M/seq" | cut -d' ' -f1)
  [[ $got == "$SEQ_SUM" ]] || { seq_ok="differs"; break; }
  wait_stat "$FS" restores ">" "$restores0" || true
  fetched=$(( $(stat_of "$FS" store_read_bytes) + $(stat_of "$FS" restore_bytes) - fetched0 ))
  cached=$(( $(stat_of "$FS" cache_reads) - cached0 ))
  if [[ $fetched -gt 0 ]]; then seq_ok="read"; break; fi
  sleep 0.5 # still on flash: evicted by a later round
done
if [[ $seq_ok == read && $fetched -le $(( (40 + 2) << 20 )) && $cached -gt 0 ]]; then
  pass "a sequential read of an evicted 20 MiB file: the right bytes, $((fetched >> 20)) MiB fetched from the store, $cached reads from the block cache"
else
  fail "a sequential read of an evicted 20 MiB file: ${seq_ok:-never evicted}, ${fetched:-?} bytes fetched, ${cached:-?} reads from the block cache"
fi
rm -f "$M/seq"

# A slow, flaky store: 200 ms per request, one in 20 answered 503, one in 20 cut short.
stop_pids "$PROXY_PID"
start_proxy "$PX" "$S3" --delay-ms 200 --fail-every 20 --cut-every 20
write_files "$M" 4 h
if "$CFS" tier flush "127.0.0.1:$FS" --wait --timeout 300 >"$WORK/flush4.out" 2>&1; then
  pass "flaky store: the flush completes"
else
  fail "flaky store: $(tail -3 "$WORK/flush4.out")"
fi
if check_files "$M"; then
  pass "flaky store: every file reads back byte-identical ($(grep -c FAILED "$WORK/requests") requests answered 503, $(grep -c CUT "$WORK/requests") cut short on the way)"
else
  fail "flaky store: files differ"
fi
requests_ok && pass "still only PUT, ranged GET and DELETE" || fail "the store saw other requests"
stop_server
stop_pids "$PROXY_PID" "$S3_PID"
PROXY_PID=""
S3_PID=""

# The same against moto_server.
MO=$((BASE + 3)); FS2=$((BASE + 4))
STORE=moto
STORE_PORT=$MO
mv "$WORK/requests" "$WORK/requests.s3s"
rm -f "$WORK/digests"
start_moto "$MO" || { fail "moto_server does not start: $(tail -3 "$WORK/moto.log")"; }
start_proxy "$PX" "$MO"
start_server n2 "$FS2" "$PX"
M2=$WORK/m2
mount_at "$M2" "$FS2"
write_files "$M2" 5
if "$CFS" tier flush "127.0.0.1:$FS2" --wait --timeout 120 >/dev/null 2>&1 && wait_stat "$FS2" flash_bytes == 0; then
  pass "moto: flushed and evicted"
else
  fail "moto: flush/evict (flash $(stat_of "$FS2" flash_bytes) bytes)"
fi
if check_files "$M2"; then
  pass "moto: every file reads back byte-identical ($(count_req GET) ranged GETs)"
else
  fail "moto: files differ"
fi
compaction_test "moto: " "$M2" "$FS2"
# A slow, flaky moto: tiering completes and every byte reads back.
stop_pids "$PROXY_PID"
start_proxy "$PX" "$MO" --delay-ms 200 --fail-every 20 --cut-every 20
write_files "$M2" 11 h
if "$CFS" tier flush "127.0.0.1:$FS2" --wait --timeout 300 >"$WORK/flush5.out" 2>&1 && wait_stat "$FS2" flash_bytes == 0; then
  pass "moto, flaky: flushed and evicted"
else
  fail "moto, flaky: $(tail -3 "$WORK/flush5.out") (flash $(stat_of "$FS2" flash_bytes) bytes)"
fi
if check_files "$M2"; then
  pass "moto, flaky: every file reads back byte-identical ($(grep -c FAILED "$WORK/requests") requests answered 503, $(grep -c CUT "$WORK/requests") cut short)"
else
  fail "moto, flaky: files differ"
fi
requests_ok && pass "moto: only PUT, ranged GET and DELETE" || fail "moto: other requests"
stop_server
stop_pids "$PROXY_PID" "$S3_PID"
PROXY_PID=""
S3_PID=""

# A three-node cluster (init/join, R=3, two metadata shards, so two leaders tier): files
# flushed and evicted on every node, then the node leading shard 0 is killed: the index is
# replicated metadata, so the survivors read every byte back from the store.
S3C=$((BASE + 5)); PXC=$((BASE + 6))
mv "$WORK/requests" "$WORK/requests.moto"
rm -f "$WORK/digests"
start_s3s "$S3C" "$WORK/s3c"
start_proxy "$PXC" "$S3C"
ADDRS=""
for i in 1 2 3; do
  port=$((BASE + 10 + i))
  ADDRS+="${ADDRS:+,}127.0.0.1:$port"
  mkdir -p "$WORK/c$i"
  cat >"$WORK/c$i.toml" <<CONF
data_dir = "$WORK/c$i"
[[devices]]
path = "data0.img"
size = "512M"
[hugepages]
pool_mib = 16
[server]
listen = "127.0.0.1:$port"
[rma]
transport = "tcp"
[cluster]
tick_ms = 50
replica_timeout_ms = 2000
[tier]
endpoint = "http://127.0.0.1:$PXC"
bucket = "$BUCKET"
prefix = "t1"
access_key_id = "$KEY"
secret_access_key = "$SECRET"
blob_kib = 1024
min_age_ms = 3600000
evict_above_pct = 0
evict_to_pct = 0
scan_interval_ms = 300
CONF
  "$BIN" format --config "$WORK/c$i.toml" >/dev/null 2>&1
done
start_node() { # start_node I
  "$BIN" run --config "$WORK/c$1.toml" >>"$WORK/c$1.log" 2>&1 &
  NODE_PIDS[$1]=$!
  for _ in $(seq 1 100); do
    grep -q "serving on" "$WORK/c$1.log" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
TOKEN=$("$BIN" init --config "$WORK/c1.toml" --replicas 3 --meta-replicas 3 --meta-shards 2 2>"$WORK/init.err") || { cat "$WORK/init.err"; exit 1; }
start_node 1
for i in 2 3; do
  "$BIN" join "$TOKEN" --config "$WORK/c$i.toml" >/dev/null 2>>"$WORK/join.err" || { cat "$WORK/join.err"; exit 1; }
  start_node "$i"
done
SERVERS="${TOKEN%@*}@$ADDRS"
# Until every shard's group has all three as voters (then any one node may die).
for _ in $(seq 1 150); do
  "$CFS" status "$SERVERS" --json 2>/dev/null | python3 -c '
import json, sys
views = []
for l in sys.stdin:
    try:
        views.append(json.loads(l.split(" ", 1)[1]))
    except (ValueError, IndexError):
        pass
ok = len(views) == 3 and all(sorted(s["voters"]) == [1, 2, 3] for v in views for s in v["shards"])
sys.exit(0 if ok else 1)' && break
  sleep 0.2
done
MC=$WORK/mc
mkdir -p "$MC"
"$CFS" mount "$SERVERS" "$MC" --transport tcp >>"$MC.log" 2>&1 &
MOUNT_PIDS+=($!)
for _ in $(seq 1 100); do grep -q " $MC fuse" /proc/mounts && break; sleep 0.1; done
mkdir -p "$MC/a" "$MC/b"
write_files "$MC/a" 8 a
write_files "$MC/b" 9 b
sed -i -e 's/^a/a\/a/' -e 's/^b/b\/b/' "$WORK/digests"
total=$(python3 -c "import os; print(sum(os.path.getsize('$MC/'+l.split()[0]) for l in open('$WORK/digests')))")
if "$CFS" tier flush "$SERVERS" --wait --timeout 120 >"$WORK/flushc.out" 2>&1; then
  evicted=0
  for _ in $(seq 1 100); do
    evicted=$("$CFS" tier status "$SERVERS" --json 2>/dev/null | python3 -c "
import json, sys
print(sum(json.loads(l.split(' ', 1)[1])['stats']['evicted_bytes'] for l in sys.stdin))")
    [[ $evicted -eq $total ]] && break
    sleep 0.2
  done
  [[ $evicted -eq $total ]] && pass "cluster: flushed and evicted all $total bytes ($(count_req PUT) PUTs by the shards' leaders)" || fail "cluster: evicted $evicted of $total bytes"
else
  fail "cluster: flush: $(tail -3 "$WORK/flushc.out")"
fi
# The leader of shard 0 dies; the survivors elect another and read everything back.
leader=$("$CFS" status "$SERVERS" --json 2>/dev/null | python3 -c "
import json, sys
for l in sys.stdin:
    try:
        v = json.loads(l.split(' ', 1)[1])
    except ValueError:
        continue
    if v.get('role') == 'leader':
        print(v['node']); break")
if [[ -n $leader ]]; then
  kill -9 "${NODE_PIDS[$leader]}"
  wait "${NODE_PIDS[$leader]}" 2>/dev/null || true
  if check_files "$MC"; then
    pass "cluster: node $leader (leading shard 0) killed; every file reads back byte-identical from the store ($(count_req GET) ranged GETs)"
  else
    fail "cluster: files differ after the leader's loss"
  fi
else
  fail "cluster: no leader found"
fi
requests_ok && pass "cluster: only PUT, ranged GET and DELETE" || fail "cluster: other requests"
stop_pids "${MOUNT_PIDS[@]}"
MOUNT_PIDS=()
grep -q " $MC fuse" /proc/mounts && { fusermount3 -u "$MC" 2>/dev/null || umount -l "$MC"; }
stop_pids "${NODE_PIDS[@]}"

echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
