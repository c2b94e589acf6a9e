#!/usr/bin/env bash
# scripts/test-hugepages.sh - tests for scripts/hugepages (run as root: `make test-hugepages`).
#
# Reserves a few 2M hugepages (at most 64 MiB), checks setup / status / release,
# and always puts the machine back as it found it (trap on EXIT/INT/TERM).
# Without root only the argument-checking tests run; the rest print "SKIP: not root".
# check() takes its condition as an eval'd single-quoted string, expanded when it runs:
# shellcheck disable=SC2016
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HP=$HERE/hugepages
SYS_HP=/sys/kernel/mm/hugepages
NR_2M=$SYS_HP/hugepages-2048kB/nr_hugepages
NR_1G=$SYS_HP/hugepages-1048576kB/nr_hugepages

PASSED=0
FAILED=0
OUT=""
RC=0

pass() { PASSED=$((PASSED + 1)); printf 'ok   - %s\n' "$1"; }
fail() {
    FAILED=$((FAILED + 1))
    printf 'FAIL - %s\n' "$1"
    if [[ -n $OUT ]]; then
        printf '       | %s\n' "exit $RC; output:"
        printf '%s\n' "$OUT" | sed 's/^/       | /'
    fi
}
check() { # check DESCRIPTION COMMAND... : pass if the command succeeds
    local desc=$1
    shift
    if "$@"; then pass "$desc"; else fail "$desc"; fi
}
# run ARGS... : run scripts/hugepages, capture combined output in OUT and exit code in RC
run() {
    RC=0
    OUT=$("$HP" "$@" 2>&1) || RC=$?
}
contains() { [[ $OUT == *"$1"* ]]; }
read_nr() { local v; read -r v <"$1"; printf '%s' "$v"; }

finish() {
    printf '%s passed, %s failed\n' "$PASSED" "$FAILED"
    (( FAILED == 0 ))
}

[[ -x $HP ]] || { echo "FAIL - $HP is missing or not executable"; echo "0 passed, 1 failed"; exit 1; }

# --- tests that do not need root ------------------------------------------------

run --help
check "--help prints usage and exits 0" eval '(( RC == 0 )) && contains "Usage:"'

run frobnicate
check "unknown command fails" eval '(( RC != 0 )) && contains "unknown command"'

run setup --count 16 --bogus
check "unknown option fails" eval '(( RC != 0 )) && contains "unknown option"'

if [[ ! -d $SYS_HP/hugepages-2048kB ]]; then
    echo "SKIP: this kernel has no 2M hugepages ($SYS_HP/hugepages-2048kB missing)"
    finish
    exit $?
fi

supported=()
for d in "$SYS_HP"/hugepages-*kB; do
    kb=${d##*/hugepages-}
    kb=${kb%kB}
    if (( kb % 1048576 == 0 )); then supported+=("$((kb / 1048576))G")
    elif (( kb % 1024 == 0 )); then supported+=("$((kb / 1024))M")
    else supported+=("${kb}K"); fi
done

run setup --size 3M --count 1
ok=1
(( RC != 0 )) || ok=0
for s in "${supported[@]}"; do contains "$s" || ok=0; done
(( ok )) && contains "3M" || ok=0
check "--size 3M fails and names the supported sizes (${supported[*]})" test "$ok" = 1

run setup --count abc
check "--count abc fails" eval '(( RC != 0 )) && contains "abc"'

run setup --mem 12Q
check "--mem 12Q fails" eval '(( RC != 0 )) && contains "12Q"'

run setup --count 16 --mem 32M
check "--count together with --mem fails" eval '(( RC != 0 ))'

if [[ $EUID -ne 0 ]]; then
    run setup --count 16
    check "setup as non-root fails with 'must run as root'" eval '(( RC != 0 )) && contains "must run as root"'
    echo "SKIP: not root - the setup/status/release tests need root (they write $NR_2M)"
    finish
    exit $?
fi

# --- root tests ---------------------------------------------------------------------

ORIG_2M=$(read_nr "$NR_2M")
ORIG_1G=""
[[ -e $NR_1G ]] && ORIG_1G=$(read_nr "$NR_1G")
echo "# before: 2M nr_hugepages=$ORIG_2M${ORIG_1G:+, 1G nr_hugepages=$ORIG_1G}"

TMP=$(mktemp -d /tmp/test-hugepages.XXXXXX)
export CFS_HUGEPAGES_STATE_DIR=$TMP/state   # keep away from a real /run/cfs-hugepages
export CFS_HUGEPAGES_MOUNT=$TMP/mnt         # where setup mounts hugetlbfs, if it does
STATE_FILE=$CFS_HUGEPAGES_STATE_DIR/state
HOLD_MNT=$TMP/hold

is_mounted() { awk -v m="$1" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; }

# Put everything back; safe to call more than once.
restore_machine() {
    rm -f "$HOLD_MNT"/* 2>/dev/null || true
    if is_mounted "$HOLD_MNT"; then umount "$HOLD_MNT" || true; fi
    "$HP" release >/dev/null 2>&1 || true
    if is_mounted "$CFS_HUGEPAGES_MOUNT"; then umount "$CFS_HUGEPAGES_MOUNT" || true; fi
    if [[ $(read_nr "$NR_2M") != "$ORIG_2M" ]]; then echo "$ORIG_2M" >"$NR_2M" || true; fi
    if [[ -n $ORIG_1G && $(read_nr "$NR_1G") != "$ORIG_1G" ]]; then
        echo "$ORIG_1G" >"$NR_1G" || true
    fi
    rm -rf "$TMP"
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    restore_machine
    echo "# interrupted or failed early (exit $rc); restored 2M nr_hugepages=$(read_nr "$NR_2M")"
    printf '%s passed, %s failed\n' "$PASSED" "$((FAILED > 0 ? FAILED : 1))"
    exit $((rc == 0 ? 1 : rc))
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mounted_before=0
grep -q ' hugetlbfs .*pagesize=2M' /proc/mounts && mounted_before=1

# setup --count 16
run setup --count 16
nr=$(read_nr "$NR_2M")
check "setup --count 16 exits 0" eval '(( RC == 0 ))'
check "setup --count 16: nr_hugepages >= 16 (got $nr)" eval '(( nr >= 16 ))'
if (( ORIG_2M < 16 )); then
    check "setup --count 16 reports '$ORIG_2M -> 16'" contains "2M hugepages: $ORIG_2M -> 16 (32 MiB)"
    check "state file records the original count" eval '[[ -f $STATE_FILE ]] && grep -qx "pages 2048 all $ORIG_2M" "$STATE_FILE"'
fi
if (( ! mounted_before )); then
    check "setup mounted a hugetlbfs at $CFS_HUGEPAGES_MOUNT" eval 'is_mounted "$CFS_HUGEPAGES_MOUNT" && contains "mounted hugetlbfs"'
fi

# setup again: idempotent
before=$(read_nr "$NR_2M")
# shellcheck disable=SC2034  # used in an eval'd check below
STATE_BEFORE=$(cat "$STATE_FILE" 2>/dev/null || true)
run setup --count 16
check "setup --count 16 again exits 0 and reports no change" eval '(( RC == 0 )) && contains "nothing changed"'
check "setup --count 16 again leaves nr_hugepages at $before" eval '[[ $(read_nr "$NR_2M") == "$before" ]]'
check "setup --count 16 again leaves the state file alone" eval '[[ $(cat "$STATE_FILE" 2>/dev/null || true) == "$STATE_BEFORE" ]]'

# setup --mem 64M = 32 pages
run setup --mem 64M
nr=$(read_nr "$NR_2M")
check "setup --mem 64M exits 0" eval '(( RC == 0 ))'
check "setup --mem 64M: nr_hugepages >= 32 (got $nr)" eval '(( nr >= 32 ))'
if (( ORIG_2M < 32 )); then
    check "setup --mem 64M reports '-> 32 (64 MiB)'" contains "-> 32 (64 MiB)"
    check "state file still records the first original ($ORIG_2M)" eval 'grep -qx "pages 2048 all $ORIG_2M" "$STATE_FILE"'
fi

# too much memory
run setup --mem 100T
check "setup --mem 100T fails with 'not enough free memory'" eval '(( RC != 0 )) && contains "not enough free memory" && contains "MemAvailable"'
check "failed setup left nr_hugepages at $nr" eval '[[ $(read_nr "$NR_2M") == "$nr" ]]'

run setup --count 1 --node 99999
check "setup --node 99999 fails with 'unknown NUMA node'" eval '(( RC != 0 )) && contains "unknown NUMA node"'

# status
run status
check "status exits 0" eval '(( RC == 0 ))'
check "status shows the 2M count ($nr)" eval 'grep -Eq "^2M +all +$nr \(" <<<"$OUT"'
if (( ORIG_2M < 32 )); then
    check "status shows the recorded original ($ORIG_2M)" eval 'grep -Eq "^2M +all .* $ORIG_2M +(free|IN USE|reserved)" <<<"$OUT"'
fi
check "status mentions hugetlbfs mounts" contains "hugetlbfs mounted:"

# release
run release
check "release exits 0" eval '(( RC == 0 ))'
check "release restores 2M nr_hugepages to $ORIG_2M" eval '[[ $(read_nr "$NR_2M") == "$ORIG_2M" ]]'
if [[ -n $ORIG_1G ]]; then
    check "1G nr_hugepages untouched ($ORIG_1G)" eval '[[ $(read_nr "$NR_1G") == "$ORIG_1G" ]]'
fi
if (( ORIG_2M < 32 )); then
    check "release reports '32 -> $ORIG_2M'" contains "2M hugepages: 32 -> $ORIG_2M"
fi
check "release removed the state file" eval '[[ ! -e $STATE_FILE ]]'
if (( ! mounted_before )); then
    check "release unmounted the hugetlbfs setup mounted" eval '! is_mounted "$CFS_HUGEPAGES_MOUNT" && [[ ! -e $CFS_HUGEPAGES_MOUNT ]]'
fi

run release
check "second release says 'nothing to release' and exits 0" eval '(( RC == 0 )) && contains "nothing to release"'

# release while pages are in use: hold 2 pages with a file in our own hugetlbfs
if (( ORIG_2M == 0 )) && command -v fallocate >/dev/null 2>&1; then
    run setup --count 4 --no-mount
    mkdir -p "$HOLD_MNT"
    if (( RC == 0 )) && mount -t hugetlbfs -o pagesize=2M none "$HOLD_MNT" &&
        fallocate -l 4M "$HOLD_MNT/hold"; then
        run release
        check "release with pages in use exits non-zero and names the size" eval '(( RC != 0 )) && contains "2M hugepages" && contains "still in use"'
        check "pages in use are kept as surplus" eval '[[ $(read_nr "$SYS_HP/hugepages-2048kB/surplus_hugepages") == 2 ]]'
        rm -f "$HOLD_MNT/hold"
        umount "$HOLD_MNT"
        check "after the holder is gone, 2M nr_hugepages is back to $ORIG_2M" eval '[[ $(read_nr "$NR_2M") == "$ORIG_2M" ]]'
    else
        echo "SKIP: could not hold hugepages through a hugetlbfs file (in-use release test)"
    fi
else
    echo "SKIP: in-use release test (needs 0 pre-reserved 2M pages and fallocate)"
fi

trap - EXIT INT TERM
restore_machine
after=$(read_nr "$NR_2M")${ORIG_1G:+/$(read_nr "$NR_1G")}
check "machine restored: 2M${ORIG_1G:+/1G} nr_hugepages = $after (was $ORIG_2M${ORIG_1G:+/$ORIG_1G})" \
    eval '[[ $after == "$ORIG_2M${ORIG_1G:+/$ORIG_1G}" ]]'
finish
