#!/usr/bin/env bash
# scripts/test-posix.sh - POSIX conformance of a real ClaudeFS mount (root only):
#   pjdfstest (at least 370 passed, no unexpected failure, listed failures must still fail),
#   fsx (20 000 operations with a fixed seed, and 20 000 with a random seed that is printed),
#   fsx with every operation (fallocate, punch hole, mmap, copy_file_range...) on a plain mount
#   and on a --writeback-cache mount; sparse files past 4 GiB, fallocate modes,
#   SEEK_DATA/SEEK_HOLE and shared writable mmap through the kernel;
#   two mounts of one server (close-to-open: what one writes and closes, the other reads),
#   kill -9 of the server under a write+fsync load: after restart every fsync'd byte is intact.
# Starts its own server and mounts under a temporary directory; cleans everything up on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "ok   - $1"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL - $1"; }

if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: FUSE mount tests need root"
  echo "0 passed, 0 failed"
  exit 0
fi
for tool in pjdfstest fsx fusermount3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run 'make deps'" >&2; exit 1; }
done
id tests >/dev/null 2>&1 || useradd -M -U tests

(cd "$ROOT" && cargo build --release -q -p cfs-dataplane -p cfs-fuse-client)
BIN=$ROOT/target/release/cfs-dataplane
CFS=$ROOT/target/release/cfs
WORK=$(mktemp -d /tmp/cfs-posix.XXXXXX)
chmod 755 "$WORK" # pjdfstest switches to unprivileged users who must reach the mount
PORT=$((20000 + RANDOM % 20000))
SERVER_PID=""
MOUNT_PIDS=()

cleanup() {
  set +e
  stop_watchdog
  # cfs mount unmounts itself on SIGTERM; then make sure nothing is left mounted.
  stop_pids "${MOUNT_PIDS[@]}"
  for m in "$WORK"/m1 "$WORK"/m2 "$WORK"/m3; do
    if grep -q " $m fuse" /proc/mounts; then fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; fi
  done
  # shellcheck disable=SC2086 # may be empty
  stop_pids $SERVER_PID
  rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=lib/watchdog.sh
source "$ROOT/scripts/lib/watchdog.sh"
start_watchdog test-posix
[[ -n ${KEEP_WORK:-} ]] && trap - EXIT

cat >"$WORK/cfs.toml" <<CONF
data_dir = "$WORK/node"
[[devices]]
path = "data0.img"
size = "2G"
[hugepages]
pool_mib = 32
[server]
listen = "127.0.0.1:$PORT"
CONF

start_server() {
  "$BIN" run --config "$WORK/cfs.toml" >>"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    grep -q "serving on" "$WORK/server.log" 2>/dev/null && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; return 1; }
    sleep 0.1
  done
  return 1
}

mount_at() { # mount_at DIR [cfs mount options]
  mkdir -p "$1"
  "$CFS" mount "127.0.0.1:$PORT" "$@" >>"$WORK/mount.log" 2>&1 &
  MOUNT_PIDS+=($!)
  for _ in $(seq 1 100); do
    grep -q " $1 fuse" /proc/mounts && return 0
    sleep 0.1
  done
  cat "$WORK/mount.log"
  return 1
}

"$BIN" format --config "$WORK/cfs.toml" >/dev/null
start_server || { echo "server did not start"; exit 1; }
mount_at "$WORK/m1"
mount_at "$WORK/m2"
mount_at "$WORK/m3" --writeback-cache

# pjdfstest
mkdir "$WORK/m1/pjd"
(cd "$WORK/m1/pjd" && pjdfstest -c "$ROOT/fuse-client/tests/posix/pjdfstest.toml" -p "$WORK/m1/pjd") >"$WORK/pjd.out" 2>&1 || true
summary=$(grep '^Summary:' "$WORK/pjd.out" || true)
echo "pjdfstest: ${summary:-no summary}"
passed_n=$(sed -n 's/.* \([0-9]*\) passed.*/\1/p' <<<"$summary")
mapfile -t failed_cases < <(grep -E '^[a-z_:0-9]+ +FAILED' "$WORK/pjd.out" | awk '{print $1}')
mapfile -t expected < <(grep -vE '^\s*(#|$)' "$ROOT/fuse-client/tests/posix/expected-failures.txt" | awk '{print $1}')
unexpected=0
for c in "${failed_cases[@]}"; do
  if ! printf '%s\n' "${expected[@]}" | grep -qx "$c"; then echo "  unexpected failure: $c"; unexpected=$((unexpected + 1)); fi
done
now_passing=0
for c in "${expected[@]}"; do
  if ! printf '%s\n' "${failed_cases[@]}" | grep -qx "$c"; then echo "  listed as failing but passed: $c (remove it from expected-failures.txt)"; now_passing=$((now_passing + 1)); fi
done
if [[ -n $passed_n && $passed_n -ge 370 && $unexpected -eq 0 && $now_passing -eq 0 ]]; then
  pass "pjdfstest: $passed_n passed, no unexpected failures"
else
  fail "pjdfstest: ${passed_n:-?} passed, $unexpected unexpected failures, $now_passing listed cases now pass"
  grep -E 'FAILED' -A3 "$WORK/pjd.out" | head -60
fi

# fsx: fixed seed, then a random one (printed so it can be replayed)
if fsx -N 20000 -S 7 "$WORK/m1/fsx.fixed" >"$WORK/fsx1.out" 2>&1 && grep -q "A-OK" "$WORK/fsx1.out"; then
  pass "fsx 20000 operations, seed 7"
else
  fail "fsx seed 7"; tail -20 "$WORK/fsx1.out"
fi
SEED=$((RANDOM * 32768 + RANDOM))
echo "fsx random seed: $SEED (replay: fsx -N 20000 -S $SEED FILE)"
if fsx -N 20000 -S "$SEED" "$WORK/m1/fsx.random" >"$WORK/fsx2.out" 2>&1 && grep -q "A-OK" "$WORK/fsx2.out"; then
  pass "fsx 20000 operations, seed $SEED"
else
  fail "fsx seed $SEED"; tail -20 "$WORK/fsx2.out"
fi

# fsx with every operation, on the plain mount and on the writeback-cache mount
for m in m1 m3; do
  if fsx -N 10000 -S 11 -f "$ROOT/fuse-client/tests/posix/fsx-full.toml" -P "$WORK" "$WORK/$m/fsx.full" >"$WORK/fsx-$m.out" 2>&1 &&
    grep -q "A-OK" "$WORK/fsx-$m.out"; then
    pass "fsx 10000 operations incl. fallocate, punch hole, mmap, copy_file_range on $m$([[ $m == m3 ]] && echo ' (writeback cache)')"
  else
    fail "fsx full on $m"; tail -20 "$WORK/fsx-$m.out"
  fi
done

# Sparse files past 4 GiB, fallocate modes, SEEK_DATA/SEEK_HOLE, shared writable mmap
if python3 - "$WORK/m1" "$WORK/m2" <<'PY'
import mmap, os, subprocess, sys
m1, m2 = sys.argv[1], sys.argv[2]
def check(cond, what):
    if not cond:
        print("  " + what); sys.exit(1)
# A file over 4 GiB: a write at 5 GiB, holes before it, read back through the other mount.
p = os.path.join(m1, "big.sparse")
fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
G = 1 << 30
os.pwrite(fd, b"head", 0)
os.pwrite(fd, b"past four gigabytes", 5 * G)
os.close(fd)
check(os.stat(p).st_size == 5 * G + 19, "size of the 5 GiB file")
fd = os.open(os.path.join(m2, "big.sparse"), os.O_RDONLY)
check(os.pread(fd, 19, 5 * G) == b"past four gigabytes", "data at 5 GiB")
check(os.pread(fd, 4096, 3 * G) == bytes(4096), "hole at 3 GiB reads zeros")
h = os.lseek(fd, 0, os.SEEK_HOLE)
check(h == 4096, f"first hole at {h}, not 4096")
check(os.lseek(fd, 4096, os.SEEK_DATA) == 5 * G, "next data at 5 GiB")
check(os.lseek(fd, 5 * G, os.SEEK_HOLE) == 5 * G + 19, "hole at end of file")
try:
    os.lseek(fd, 5 * G + 19, os.SEEK_DATA); check(False, "SEEK_DATA at EOF must fail")
except OSError as e:
    check(e.errno == 6, "SEEK_DATA at EOF gives ENXIO")
os.close(fd)
# fallocate(1): allocate, punch a hole, zero a range.
p = os.path.join(m1, "falloc")
with open(p, "wb") as f:
    f.write(b"\x07" * 3 * 65536)
run = lambda *a: subprocess.run(["fallocate", *a, p], check=True)
run("-n", "-l", str(1 << 20), "-o", "0")
check(os.stat(p).st_size == 3 * 65536, "fallocate --keep-size keeps the size")
run("-l", "65536", "-o", str(3 * 65536))
check(os.stat(p).st_size == 4 * 65536, "fallocate past the end extends")
run("--punch-hole", "-o", "65536", "-l", "65536")
run("--zero-range", "-o", "10", "-l", "20")
with open(p, "rb") as f:
    d = f.read()
check(d[:10] == b"\x07" * 10 and d[10:30] == bytes(20) and d[30:65536] == b"\x07" * (65536 - 30), "zero range")
check(d[65536:131072] == bytes(65536) and d[131072:196608] == b"\x07" * 65536, "punched hole")
fd = os.open(p, os.O_RDONLY)
check(os.lseek(fd, 0, os.SEEK_HOLE) == 65536, "punched range is a hole")
check(os.lseek(fd, 65536, os.SEEK_DATA) == 131072, "data after the hole")
os.close(fd)
# Shared writable mmap: stores through the mapping reach the file and the other mount.
p = os.path.join(m1, "mapped")
with open(p, "wb") as f:
    f.write(bytes(3 * 4096))
with open(p, "r+b") as f:
    mm = mmap.mmap(f.fileno(), 3 * 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mm[4096:4101] = b"mmap!"
    mm.flush()
    mm.close()
with open(os.path.join(m2, "mapped"), "rb") as f:
    check(f.read()[4096:4101] == b"mmap!", "mmap store visible through the other mount")
PY
then pass "sparse file past 4 GiB, fallocate/punch/zero range, SEEK_DATA/SEEK_HOLE, shared writable mmap"
else fail "sparse/fallocate/seek/mmap checks"; fi

# Writeback-cache mount: close-to-open towards a plain mount
head -c 1000000 /dev/urandom >"$WORK/blob3"
cp "$WORK/blob3" "$WORK/m3/wb.bin"
if cmp -s "$WORK/blob3" "$WORK/m2/wb.bin"; then pass "writeback-cache mount: another mount reads what it wrote and closed"; else fail "writeback-cache close-to-open"; fi

# Two mounts: close-to-open
head -c 3000000 /dev/urandom >"$WORK/blob"
cp "$WORK/blob" "$WORK/m1/shared.bin"
mkdir -p "$WORK/m1/dir/sub"
if cmp -s "$WORK/blob" "$WORK/m2/shared.bin" && [[ -d $WORK/m2/dir/sub ]]; then
  pass "second mount sees what the first wrote and closed"
else
  fail "second mount does not see the first mount's writes"
fi
echo "appended" >>"$WORK/m2/shared.bin"
if tail -c 9 "$WORK/m1/shared.bin" | grep -q appended; then pass "first mount sees the second's append after close"; else fail "append not visible across mounts"; fi

# POSIX (fcntl) and BSD (flock) locks among processes of one client
if python3 - "$WORK/m1/lockfile" <<'PY'
import fcntl, os, subprocess, sys
path = sys.argv[1]
open(path, "w").close()
probe = """
import fcntl, sys
f = open(sys.argv[1], "r+")
try:
    getattr(fcntl, sys.argv[2])(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("got")
except OSError:
    print("busy")
"""
for kind in ("lockf", "flock"):
    f = open(path, "r+")
    getattr(fcntl, kind)(f, fcntl.LOCK_EX)
    held = subprocess.run([sys.executable, "-c", probe, path, kind], capture_output=True, text=True).stdout.strip()
    getattr(fcntl, kind)(f, fcntl.LOCK_UN)
    free = subprocess.run([sys.executable, "-c", probe, path, kind], capture_output=True, text=True).stdout.strip()
    f.close()
    if (held, free) != ("busy", "got"):
        print(f"{kind}: while held {held}, after unlock {free}")
        sys.exit(1)
PY
then pass "fcntl and flock locks exclude another process on the same mount"; else fail "locks"; fi

# kill -9 of the server under write+fsync: every fsync'd record survives
python3 - "$WORK/m1/durable.log" "$WORK/acked" <<'PY' &
import os, sys, time
path, acked = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
with open(acked, "w") as a:
    for i in range(100000):
        rec = f"record {i:08d} " + "x" * 100 + "\n"
        try:
            os.write(fd, rec.encode())
            os.fsync(fd)
        except OSError:
            break
        a.write(f"{i}\n"); a.flush()
PY
WRITER=$!
sleep 2
kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""
wait "$WRITER" 2>/dev/null || true
n_acked=$(wc -l <"$WORK/acked")
if "$BIN" fsck --config "$WORK/cfs.toml" >"$WORK/fsck.out" 2>&1; then
  pass "fsck after kill -9: $(tail -1 "$WORK/fsck.out")"
else
  fail "fsck after kill -9"; cat "$WORK/fsck.out"
fi
start_server || { echo "server did not restart"; exit 1; }
# The mounts reconnect by themselves.
got=""
for _ in $(seq 1 50); do
  if got=$(cat "$WORK/m1/durable.log" 2>/dev/null); then break; fi
  sleep 0.2
done
ok=1
last=$((n_acked - 1))
if ((n_acked == 0)); then ok=0; fi
for i in 0 $((last / 2)) "$last"; do
  ((i < 0)) && continue
  grep -q "^record $(printf %08d "$i") " <<<"$got" || { ok=0; echo "  fsync'd record $i missing"; }
done
lines=$(grep -c '^record ' <<<"$got" || true)
if ((ok == 1 && lines >= n_acked)); then
  pass "kill -9 under write+fsync: all $n_acked fsync'd records present after restart ($lines on disk)"
else
  fail "kill -9: $n_acked records acknowledged, $lines found"
fi

echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
