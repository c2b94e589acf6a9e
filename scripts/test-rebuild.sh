#!/usr/bin/env bash
# scripts/test-rebuild.sh - joining with a token, rebalancing, and losing a node for good
# (root only):
#   node 1 creates a cluster (`cfs-dataplane init`, R=3, three metadata voters) and prints a
#   join token; nodes 2 and 3 join with it and become voters. Clients without the token, or
#   with another cluster's, are refused with a clear message. Files are written through a FUSE
#   mount given the token; node 4 joins and chunk copies are rebalanced onto it (it stays a
#   learner). Every chunk's copies are compared byte by byte (cfs-dataplane verify). Then a
#   voter (node 1, whose address alone is in the token the mount got) is killed with SIGKILL
#   and its data directory deleted: the leader must remove it after
#   dead_after_ms, promote the learner, and re-replicate every chunk until each has three
#   current copies on the three survivors - compared byte by byte once more - while writes go
#   on; every acknowledged file must read back.
#   Before that, a shard leader dies half-way through a write (a test fault: the change reaches
#   its own copy and one other holder's, then the process aborts): the new leader must find
#   the copies that differ, record them stale and have them rewritten, so every copy is equal
#   again and the file reads back as wholly the old or wholly the new contents.
#   Then a node is killed while files are deleted and enough else happens for the Raft log to
#   be compacted: it comes back from a snapshot, so it never ran those deletes; it must find the
#   copies no longer its own and delete them (orphan collection).
# Starts everything under a temporary directory; stops its processes by PID and cleans up.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "ok   - $1"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL - $1"; }

if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: the rebuild test mounts FUSE and needs root"
  echo "0 passed, 0 failed"
  exit 0
fi
command -v fusermount3 >/dev/null || { echo "missing fusermount3: run 'make deps'" >&2; exit 1; }

(cd "$ROOT" && cargo build --release -q -p cfs-dataplane -p cfs-fuse-client)
BIN=$ROOT/target/release/cfs-dataplane
CFS=$ROOT/target/release/cfs
WORK=$(mktemp -d /tmp/cfs-rebuild.XXXXXX)
BASE=$((20000 + RANDOM % 20000))
declare -A PIDS=()
MOUNT_PID=""

cleanup() {
  set +e
  stop_watchdog
  # shellcheck disable=SC2086 # may be empty
  stop_pids $MOUNT_PID
  if grep -q " $WORK/mnt fuse" /proc/mounts; then fusermount3 -u "$WORK/mnt" 2>/dev/null || umount -l "$WORK/mnt"; fi
  stop_pids "${PIDS[@]}"
  rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=lib/watchdog.sh
source "$ROOT/scripts/lib/watchdog.sh"
start_watchdog test-rebuild
[[ -n ${KEEP_WORK:-} ]] && trap - EXIT

N=4
ADDRS=""
for ((i = 1; i <= N; i++)); do ADDRS+="${ADDRS:+,}127.0.0.1:$((BASE + i))"; done
for ((i = 1; i <= N + 1; i++)); do # node 5 joins at the end
  mkdir -p "$WORK/n$i"
  cat >"$WORK/n$i.toml" <<CONF
data_dir = "$WORK/n$i"
[[devices]]
path = "data0.img"
size = "512M"
[hugepages]
pool_mib = 16
[reactors]
cores = [$(((i - 1) % 2))]
[server]
listen = "127.0.0.1:$((BASE + i))"
[cluster]
tick_ms = 50
dead_after_ms = 8000
replica_timeout_ms = 2000
snapshot_every = 100
orphan_grace_ms = 2000
CONF
  "$BIN" format --config "$WORK/n$i.toml" >/dev/null 2>&1
done

start_node() { # start_node I
  # The partial-write test fault is armed while $WORK/abort exists.
  CFS_TEST_ABORT_PARTIAL_WRITE="$WORK/abort" "$BIN" run --config "$WORK/n$1.toml" >>"$WORK/n$1.log" 2>&1 &
  PIDS[$1]=$!
  for _ in $(seq 1 100); do
    grep -q "serving on" "$WORK/n$1.log" 2>/dev/null && return 0
    sleep 0.1
  done
  cat "$WORK/n$1.log"
  return 1
}
# The leader's view as JSON (empty if none answers).
leader_json() {
  "$CFS" status "${TOKEN%@*}@$ADDRS" --json 2>/dev/null | awk '{ $1 = ""; print }' |
    python3 -c 'import json, sys
for line in sys.stdin:
    try:
        v = json.loads(line)
    except ValueError:
        continue  # an unreachable node
    if v.get("role") == "leader":
        print(json.dumps(v)); break' || true
}
field() { python3 -c "import json, sys; v = json.load(sys.stdin); print($1)"; }
# groups_agree NODES...: every listed node's replica of every metadata shard has the voters
# and learners the leader's shard 0 has (a node that joined late reached every group's
# leader, whoever leads it, and applied its log); prints "True" or what differs.
groups_agree() {
  local addrs="" i
  for i in "$@"; do addrs+="${addrs:+,}127.0.0.1:$((BASE + i))"; done
  "$CFS" status "${TOKEN%@*}@$addrs" --json 2>/dev/null | awk '{ $1 = ""; print }' |
    python3 -c 'import json, sys
views = []
for line in sys.stdin:
    try:
        views.append(json.loads(line))
    except ValueError:
        pass
lead = [v for v in views if v.get("role") == "leader"]
if len(views) != int(sys.argv[1]) or not lead:
    print(f"{len(views)} of {sys.argv[1]} nodes answered, {len(lead)} leading shard 0"); sys.exit()
want = (sorted(lead[0]["shards"][0]["voters"]), sorted(lead[0]["shards"][0]["learners"]))
bad = [(v["node"], s["shard"], s["voters"], s["learners"], s["applied"]) for v in views for s in v["shards"]
       if (sorted(s["voters"]), sorted(s["learners"])) != want]
print(True if not bad else f"want voters/learners {want}; differ (node, shard, voters, learners, applied): {bad}")' "$#" || true
}

TOKEN=$("$BIN" init --config "$WORK/n1.toml" --replicas 3 --meta-replicas 3 --meta-shards "${META_SHARDS:-1}" 2>"$WORK/init.err") || { cat "$WORK/init.err"; fail "init"; exit 1; }
start_node 1
for i in 2 3; do
  "$BIN" join "$TOKEN" --config "$WORK/n$i.toml" >/dev/null 2>>"$WORK/join.err" || { cat "$WORK/join.err"; fail "join of node $i"; exit 1; }
  start_node "$i"
done
roles=""
for _ in $(seq 1 100); do
  j=$(leader_json)
  [[ -n $j ]] && roles=$(field '" ".join(m["raft"] for m in v["members"])' <<<"$j")
  [[ $roles == "voter voter voter" ]] && break
  sleep 0.2
done
if [[ $roles == "voter voter voter" ]]; then
  pass "node 1 made a cluster (init), nodes 2 and 3 joined with its token and became metadata voters"
else
  fail "after init and two joins the members are: ${roles:-no leader}"
fi

# The token is required, and another cluster's is refused, with a clear message.
no_token=$("$CFS" status "$ADDRS" 2>&1 || true)
wrong=$("$CFS" status "cfs1:$(printf '%064d' 7)@127.0.0.1:$((BASE + 1))" 2>&1 || true)
bad_join=$("$BIN" join "cfs1:$(printf '%064d' 7)@127.0.0.1:$((BASE + 1))" --config "$WORK/n4.toml" 2>&1 || true)
if grep -q "requires a cluster token" <<<"$no_token" && grep -q "refused this cluster token" <<<"$wrong" &&
  grep -q "refused this cluster token" <<<"$bad_join" && [[ ! -e $WORK/n4/cluster.toml ]]; then
  pass "without the token: $(grep -o 'the server requires[^(]*' <<<"$no_token" | head -1); with another cluster's: refused"
else
  fail "token checks: '$no_token' / '$wrong' / '$bad_join'"
fi

mkdir -p "$WORK/mnt"
"$CFS" mount "$TOKEN" "$WORK/mnt" --timeout 20 >>"$WORK/mount.log" 2>&1 &
MOUNT_PID=$!
for _ in $(seq 1 100); do grep -q " $WORK/mnt fuse" /proc/mounts && break; sleep 0.1; done
grep -q " $WORK/mnt fuse" /proc/mounts || { cat "$WORK/mount.log"; fail "mount"; exit 1; }
if grep " $WORK/mnt fuse" /proc/mounts | grep -q "cfs1:"; then fail "the token's secret shows in /proc/mounts"; fi

# write_files PREFIX COUNT SEED: files of 256 KiB .. 3 MiB (one chunk each), fsync'd; a file
# whose every call succeeded is recorded with its digest.
write_files() {
  python3 - "$WORK/mnt" "$WORK/acked" "$1" "$2" "$3" <<'PY'
import hashlib, os, random, sys
d, acked, prefix, count, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
ok = 0
with open(acked, "a") as out:
    for i in range(count):
        data = rng.randbytes(rng.randrange(256 << 10, 3 << 20))
        name = f"{prefix}{i}"
        try:
            fd = os.open(f"{d}/{name}", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            done = 0
            while done < len(data):  # a short write is no error: write the rest
                done += os.write(fd, data[done:])
            os.fsync(fd)
            os.close(fd)
        except OSError as e:
            print(f"  {name}: {e} (not acknowledged)")
            continue
        ok += 1
        out.write(f"{name} {hashlib.sha256(data).hexdigest()}\n")
print(f"  {ok} of {count} files written and acknowledged")
PY
}
check_files() {
  python3 - "$WORK/mnt" "$WORK/acked" <<'PY'
import hashlib, sys
d, acked = sys.argv[1], sys.argv[2]
n = bad = 0
for line in open(acked):
    name, digest = line.split()
    n += 1
    try:
        got = hashlib.sha256(open(f"{d}/{name}", "rb").read()).hexdigest()
    except OSError as e:
        got = str(e)
    if got != digest:
        bad += 1
        if bad <= 5:
            print(f"  {name}: {got}")
print(f"  {n} acknowledged files checked, {bad} wrong")
sys.exit(1 if bad or n == 0 else 0)
PY
}

write_files a 24 1

# Node 4 joins: it becomes a learner and a share of the chunk copies moves onto it.
"$BIN" join "$TOKEN" --config "$WORK/n4.toml" >/dev/null 2>>"$WORK/join.err" || { cat "$WORK/join.err"; fail "join of node 4"; exit 1; }
start_node 4
t0=$(date +%s)
moved=""
for _ in $(seq 1 240); do
  j=$(leader_json)
  if [[ -n $j ]]; then
    state=$(field '"%s %s %s %s %s" % (" ".join(m["raft"] for m in v["members"]), v["chunks"]["under_replicated"], v["chunks"]["misplaced"], v["chunks"]["stale_copies"], sum(1 for c, h in v["holders"] if 4 in h))' <<<"$j")
    if [[ $state =~ ^"voter voter voter learner 0 0 0 "([0-9]+)$ ]] && ((BASH_REMATCH[1] > 0)); then
      moved=${BASH_REMATCH[1]}
      break
    fi
  fi
  sleep 0.5
done
if [[ -n $moved ]]; then
  pass "node 4 joined as a learner; $moved of 24 chunks rebalanced onto it within $(($(date +%s) - t0)) s"
else
  fail "rebalance onto node 4 did not finish: ${state:-no leader}"
fi
agree=""
for _ in $(seq 1 50); do
  agree=$(groups_agree 1 2 3 4)
  [[ $agree == True ]] && break
  sleep 0.2
done
if [[ $agree == True ]]; then
  pass "every node's replica of all ${META_SHARDS:-1} metadata shard(s) lists node 4, whichever node leads the shard"
else
  fail "a late joiner did not catch up with every shard group: $agree"
fi
if out=$("$BIN" verify --servers "$TOKEN" 2>&1); then
  pass "before the loss: $(tail -1 <<<"$out")"
else
  fail "verify before the loss: $out"
fi
# Files written now have chunks the leader may not hold: it must not keep copies of them.
write_files c 12 3
stored_matches() { # stored_matches NODES...: the nodes store exactly the copies recorded
  local j total stored=0 n
  j=$(leader_json)
  total=$(field 'sum(len(h) for c, h in v["holders"])' <<<"$j")
  for i in "$@"; do
    n=$("$CFS" status "${TOKEN%@*}@127.0.0.1:$((BASE + i))" --json | grep "^127.0.0.1:$((BASE + i)) " | awk '{ $1 = ""; print }' | field 'v["store"]["chunks"]')
    stored=$((stored + n))
  done
  echo "$stored $total"
}
read -r stored total <<<"$(stored_matches 1 2 3 4)"
if ((stored == total)); then
  pass "4 nodes store $stored chunk copies, exactly the $total the placement records (no copy where the placement puts none)"
else
  fail "4 nodes store $stored chunk copies but the placement records $total"
fi

# A leader dies in the middle of a write: copies that differ are found and rewritten.
CHECK_SERVERS="${TOKEN%@*}@$ADDRS"
"$BIN" rpc-check --server "$CHECK_SERVERS" --files 1 --size $((1 << 20)) >/dev/null
touch "$WORK/abort"
if "$BIN" rpc-check --server "$CHECK_SERVERS" --files 1 --size $((1 << 20)) --seed 1 --overwrite >"$WORK/partial.out" 2>&1; then
  fail "the write with the partial-write fault armed succeeded"
fi
rm -f "$WORK/abort"
died=""
for _ in $(seq 1 50); do
  for ((i = 1; i <= N; i++)); do
    if [[ -n ${PIDS[$i]:-} ]] && ! kill -0 "${PIDS[$i]}" 2>/dev/null; then died=$i; fi
  done
  [[ -n $died ]] && break
  sleep 0.1
done
if [[ -z $died ]]; then
  fail "no node aborted on the partial-write fault: $(cat "$WORK/partial.out")"
else
  wait "${PIDS[$died]}" 2>/dev/null || true
  # While it is down, the new leader must see that copies differ (or cannot be compared).
  marked=""
  for _ in $(seq 1 60); do
    marked=$(cat "$WORK"/n*.log | grep -c "differ from those on" || true)
    ((marked > 0)) && break
    sleep 0.5
  done
  start_node "$died"
  healed=""
  for _ in $(seq 1 120); do
    j=$(leader_json)
    if [[ -n $j ]]; then
      state=$(field '"%s %s" % (v["chunks"]["stale_copies"], v["chunks"]["under_replicated"])' <<<"$j")
      if [[ $state == "0 0" ]] && ((marked > 0)); then healed=1; break; fi
    fi
    sleep 0.5
  done
  which=""
  for seed in 0 1; do
    if "$BIN" rpc-check --server "$CHECK_SERVERS" --files 1 --size $((1 << 20)) --seed $seed --verify-only >/dev/null 2>&1; then which=$seed; fi
  done
  seen=$(cat "$WORK"/n*.log | grep -o "copies on [^]]*] differ from those on [^]]*]" | head -1 || true)
  if [[ -n $healed ]] && out=$("$BIN" verify --servers "${TOKEN%@*}@$ADDRS" 2>&1) && [[ -n $which ]]; then
    pass "leader (node $died) aborted half-way through a write: the new leader found '$seen', recorded them stale, repair rewrote them; $(tail -1 <<<"$out"); the file holds the $([[ $which == 0 ]] && echo old || echo new) contents"
  else
    fail "after a leader died half-way through a write: ${marked:-0} copies recorded stale, state ${state:-?}, contents $([[ -n $which ]] && echo whole || echo mixed), verify: ${out:-not run}"
  fi
fi

# A node misses deletes (it catches up from a snapshot): its orphan copies are collected.
L=$(leader_json | field 'v["node"]')
O=2
[[ $O == "$L" ]] && O=3
node_field() { # node_field I EXPR: EXPR of node I's own status
  "$CFS" status "${TOKEN%@*}@127.0.0.1:$((BASE + $1))" --json 2>/dev/null | grep "^127.0.0.1:$((BASE + $1)) " | awk '{ $1 = ""; print }' | field "$2" 2>/dev/null || echo 0
}
held_before=$(node_field "$O" 'v["store"]["chunks"]')
kill -9 "${PIDS[$O]}"
wait "${PIDS[$O]}" 2>/dev/null || true
python3 - "$WORK/mnt" <<'PY'
import os, sys
d = sys.argv[1]
for i in range(24):
    os.unlink(f"{d}/a{i}")
os.mkdir(f"{d}/many")
for i in range(150):  # more commands than snapshot_every: the log is compacted
    open(f"{d}/many/f{i}", "w").close()
PY
grep -v "^a[0-9]* " "$WORK/acked" >"$WORK/acked.new" || true
mv "$WORK/acked.new" "$WORK/acked"
start_node "$O"
orphans=0
for _ in $(seq 1 60); do
  orphans=$(node_field "$O" 'v["orphan_copies_deleted"]')
  if ((orphans > 0)); then
    read -r stored total <<<"$(stored_matches 1 2 3 4)"
    ((stored == total)) && break
  fi
  sleep 0.5
done
read -r stored total <<<"$(stored_matches 1 2 3 4)"
if ((orphans > 0 && stored == total)); then
  pass "node $O (holding $held_before copies) missed 24 file deletions and came back from a snapshot: it deleted its $orphans orphan copies; 4 nodes store exactly the $total copies the placement records"
else
  fail "orphan collection on node $O: $orphans copies deleted; nodes store $stored copies, the placement records $total"
fi

j=$(leader_json)
L=$(field 'v["node"]' <<<"$j")

# The victim: node 1, a voter, the only address in the token the mount was given (the mount
# must keep working through the members it learned), and the leader in some runs (then the new
# leader removes it). Its vote must move to the learner.
VICTIM=1
held=$(field "sum(1 for c, h in v['holders'] if $VICTIM in h)" <<<"$j")
kill -9 "${PIDS[$VICTIM]}"
wait "${PIDS[$VICTIM]}" 2>/dev/null || true
unset "PIDS[$VICTIM]"
rm -rf "$WORK/n$VICTIM"
pass "node $VICTIM (a voter holding $held chunk copies, $([[ $VICTIM == "$L" ]] && echo "the leader" || echo "not the leader"), the only address in the mount's token) killed with SIGKILL and its disk wiped"

# Writes go on while the node is dead and while its chunks are re-replicated.
write_files b 8 2
SURV=""
for ((i = 1; i <= N; i++)); do [[ $i != "$VICTIM" ]] && SURV+="${SURV:+,}127.0.0.1:$((BASE + i))"; done

done_at=""
t0=$(date +%s)
for _ in $(seq 1 120); do
  j=$(leader_json)
  if [[ -n $j ]]; then
    state=$(field '"%s %s %s %s %s" % (v["removed"], sorted(m["raft"] for m in v["members"]), v["chunks"]["under_replicated"], v["chunks"]["misplaced"], v["chunks"]["stale_copies"])' <<<"$j")
    if [[ $state == "[$VICTIM] ['voter', 'voter', 'voter'] 0 0 0" ]]; then
      done_at=$(($(date +%s) - t0))
      break
    fi
  fi
  sleep 0.5
done
"$CFS" status "${TOKEN%@*}@$SURV" | sed 's/^/  /'
if [[ -n $done_at ]]; then
  pass "node $VICTIM removed, the learner promoted, every chunk back to 3 copies within ${done_at} s of the writes"
else
  fail "rebuild did not finish: ${state:-no leader}"
fi

if out=$("$BIN" verify --servers "${TOKEN%@*}@$SURV" 2>&1); then
  pass "after the rebuild: $(tail -1 <<<"$out") (3 copies of every chunk on 3 nodes)"
else
  fail "verify after the rebuild: $out"
fi
if check_files; then pass "every acknowledged file reads back through the mount"; else fail "acknowledged data lost"; fi

# Copies that moved off a node are deleted there: the survivors hold exactly their chunks.
SURV_IDS=""
for ((i = 1; i <= N; i++)); do [[ $i != "$VICTIM" ]] && SURV_IDS+=" $i"; done
# shellcheck disable=SC2086
read -r stored total <<<"$(stored_matches $SURV_IDS)"
if ((stored == total)); then
  pass "the survivors store $stored chunk copies, exactly the $total the placement records"
else
  fail "survivors store $stored chunk copies but the placement records $total"
fi

# Every metadata shard's Raft group has the members shard 0 has (joins and the removal were
# mirrored into the other groups; with META_SHARDS=1 there is only shard 0).
same=""
for _ in $(seq 1 50); do
  # shellcheck disable=SC2086
  same=$(groups_agree $SURV_IDS)
  [[ $same == True ]] && break
  sleep 0.2
done
if [[ $same == True ]]; then
  pass "on every survivor, all ${META_SHARDS:-1} metadata shard group(s) have the same voters and learners"
else
  fail "metadata shard groups differ in membership: $same"
fi

# A node joins once the founder is gone (the token names a survivor): its groups start from
# the founding state, which knows only the dead founder's address, yet it must reach every
# shard's leader and catch up.
if "$BIN" join "${TOKEN%@*}@127.0.0.1:$((BASE + 2))" --config "$WORK/n5.toml" >/dev/null 2>>"$WORK/join.err" && start_node 5; then
  agree=""
  for _ in $(seq 1 75); do
    # shellcheck disable=SC2086
    agree=$(groups_agree $SURV_IDS 5)
    [[ $agree == True ]] && break
    sleep 0.2
  done
  if [[ $agree == True ]]; then
    pass "node 5 joined after the founder's loss and caught up with all ${META_SHARDS:-1} shard group(s)"
  else
    fail "node 5 (joined after the founder's loss) did not catch up: $agree"
  fi
else
  fail "node 5 could not join after the founder's loss: $(tail -3 "$WORK/join.err")"
fi

echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
