# scripts/lib/watchdog.sh - sourced by the cluster test scripts: bounds a whole test run.
#
# Every wait loop in the tests is bounded by a count, but each step may itself wait on a server
# (an RPC timeout, a FUSE call the mount retries), so a hung server could stretch a run to many
# minutes. The watchdog sends SIGTERM to the test script (and its children) after TEST_BUDGET_S seconds (default
# 900); the script's TERM trap reports it and exits, and its EXIT trap stops the processes it
# started and unmounts. `stop_watchdog` (called from the cleanup) stops the watchdog itself.
start_watchdog() { # start_watchdog NAME
  local budget=${TEST_BUDGET_S:-900} name=$1
  # The watchdog holds no output file open, so a finished test never waits on it.
  # Bash runs the TERM trap only once its foreground command ends, so the script's other
  # children (a client stuck on a hung server, the servers) get SIGTERM too.
  (exec >/dev/null 2>&1 </dev/null; sleep "$budget" && kill -TERM $$ && sleep 1 && pkill -TERM -P $$) &
  WATCHDOG_PID=$!
  # shellcheck disable=SC2064 # expand the name and budget now
  trap "echo 'FAIL - $name: still running after $budget s (TEST_BUDGET_S), stopped by the watchdog'; exit 124" TERM
}
stop_watchdog() {
  [[ -n ${WATCHDOG_PID:-} ]] || return 0
  pkill -P "$WATCHDOG_PID" 2>/dev/null
  kill "$WATCHDOG_PID" 2>/dev/null
  wait "$WATCHDOG_PID" 2>/dev/null
  WATCHDOG_PID=""
  return 0
}
# stop_pids PID...: SIGTERM, up to 10 s for them to exit, then SIGKILL; reaps them. A hung
# process must not hang the cleanup too.
stop_pids() {
  local p alive _
  [[ $# -gt 0 ]] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 1 100); do
    alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  kill -KILL "$@" 2>/dev/null || true
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
  return 0
}
