#!/usr/bin/env bash
# scripts/test-vfio.sh - our userspace NVMe driver (cfs-nvme's vfio backend) on a real, emulated
# NVMe controller: boots a QEMU guest (TCG, q35, emulated intel-iommu, an emulated NVMe drive
# on a scratch image), binds the controller to vfio-pci inside it and runs `cfs-nvme-check`
# there (identify; round trips from one block to the largest transfer, PRP lists included;
# write zeroes, deallocate, flush; two polling threads on their own queue pairs; 10 000 random
# operations against a model; orderly shutdown).
#
# The guest kernel is Debian's (`apt-get download`, unpacked with dpkg -x and cached under
# target/vfio-guest); the initrd is built here from busybox-static, the kernel's vfio modules
# and the check program linked statically. Bounded by a timeout; leaves nothing running.
# Needs qemu-system-x86, busybox-static, cpio, kmod (`scripts/deps test` installs them).
#
# `scripts/test-vfio.sh --bench` boots the same guest for the benchmark instead (not a test):
# 4 KiB random reads at queue depth 32 from one polling thread, io_uring on the kernel's nvme
# driver versus our driver on vfio-pci, same emulated device, alternated twice (see
# docs/benchmarks.md).
set -euo pipefail
BENCH=""
[[ ${1:-} == --bench ]] && BENCH=1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${CFS_VFIO_CACHE:-$ROOT/target/vfio-guest}
TIMEOUT_S=${VFIO_TIMEOUT_S:-420}

for c in qemu-system-x86_64 busybox cpio depmod; do
  command -v "$c" >/dev/null || [[ -x /bin/$c || -x /sbin/$c ]] || { echo "missing $c: run 'scripts/deps test'" >&2; exit 1; }
done
BUSYBOX=$(command -v busybox || echo /bin/busybox)

WORK=$(mktemp -d /tmp/cfs-vfio.XXXXXX)
QEMU_PID=""
cleanup() {
  [[ -n $QEMU_PID ]] && kill -9 "$QEMU_PID" 2>/dev/null
  [[ -n ${KEEP_WORK:-} ]] || rm -rf "$WORK"
}
trap cleanup EXIT

# The guest kernel: the image linux-image-amd64 depends on, downloaded once.
mkdir -p "$CACHE"
if ! ls "$CACHE"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  if [[ -z $pkg ]]; then
    apt-get update -qq >/dev/null 2>&1 || true
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  fi
  [[ -n $pkg ]] || { echo "cannot find the kernel package linux-image-amd64 depends on" >&2; exit 1; }
  echo "vfio: downloading guest kernel $pkg"
  (cd "$CACHE" && rm -f ./*.deb && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >/dev/null)
  rm -rf "$CACHE/kernel"
  dpkg -x "$CACHE"/*.deb "$CACHE/kernel"
  rm -f "$CACHE"/*.deb
fi
VMLINUZ=$(ls "$CACHE"/kernel/boot/vmlinuz-* | head -1)
KVER=$(ls "$CACHE/kernel/lib/modules" | head -1)
MODS=$CACHE/kernel/lib/modules/$KVER

# The check program and the data plane, linked statically (the initrd has no C library).
echo "vfio: building cfs-nvme-check and cfs-dataplane (static)"
(cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release \
  -p cfs-nvme --bin cfs-nvme-check -p cfs-dataplane --bin cfs-dataplane \
  --target x86_64-unknown-linux-gnu --target-dir "$ROOT/target/static")
CHECK=$ROOT/target/static/x86_64-unknown-linux-gnu/release/cfs-nvme-check
DATAPLANE=$ROOT/target/static/x86_64-unknown-linux-gnu/release/cfs-dataplane
for b in "$CHECK" "$DATAPLANE"; do
  if readelf -d "$b" | grep -q NEEDED; then echo "$b is not static" >&2; exit 1; fi
done

# The initrd: busybox, the vfio modules (in load order), the check program, /init.
I=$WORK/initrd
mkdir -p "$I"/{bin,sbin,proc,sys,dev,tmp,mods}
cp "$BUSYBOX" "$I/bin/busybox"
for a in $("$BUSYBOX" --list); do
  [[ $a == busybox ]] && continue # a link named busybox to itself panics the guest
  ln -sf busybox "$I/bin/$a"
done
# Modules with what they depend on, in load order: the kernel's nvme driver (it has the
# controller at boot, as on a real server; nvme-bind takes it over) and vfio-pci. The CRC
# implementations are soft dependencies (looked up at run time), so they are named too.
declare -A SEEN=()
ORDER=()
add_mod() {
  local m=$1 f d
  [[ -n ${SEEN[$m]:-} ]] && return 0
  SEEN[$m]=1
  f=$(find "$MODS" -name "$(sed 's/[-_]/[-_]/g' <<<"$m").ko*" | head -1)
  [[ -n $f ]] || return 0 # built in
  for d in $(modinfo -F depends "$f" | tr ',' ' '); do add_mod "$d"; done
  ORDER+=("$f")
}
for m in crct10dif_generic crc64_rocksoft_generic nvme vfio-pci vfio_iommu_type1; do add_mod "$m"; done
n=10
for f in "${ORDER[@]}"; do
  m=$(basename "$f")
  case $f in
    *.ko.xz) xz -dc "$f" >"$I/mods/$n-${m%.xz}" ;;
    *.ko.zst) zstd -qdc "$f" >"$I/mods/$n-${m%.zst}" ;;
    *) cp "$f" "$I/mods/$n-$m" ;;
  esac
  n=$((n + 1))
done
cp "$CHECK" "$I/cfs-nvme-check"
cp "$DATAPLANE" "$I/cfs-dataplane"
cp "$ROOT/scripts/nvme-bind" "$ROOT/scripts/nvme-unbind" "$I/"
[[ -n $BENCH ]] && touch "$I/bench"
cat >"$I/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in /mods/*.ko; do insmod "$m" || echo "insmod $m failed"; done
ok() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; }
bdf=""
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/class")" = "0x010802" ] && bdf=$(basename "$d") && break
done
echo "CFS-GUEST-BEGIN ${bdf:-no NVMe controller}"
if [ -n "$bdf" ] && [ -f /bench ]; then
  sleep 1
  for round in 1 2; do
    blk=$(ls /sys/block | grep -m1 '^nvme')
    /cfs-nvme-check bench uring "/dev/$blk" 5
    /nvme-bind "$bdf" >/dev/null && /cfs-nvme-check bench vfio "$bdf" 5
    /nvme-unbind "$bdf" >/dev/null
    sleep 1
  done
  bdf=""
fi
if [ -n "$bdf" ]; then
  sleep 1 # let the kernel's nvme driver finish probing
  /cfs-dataplane devices >/tmp/dev1 2>&1
  if grep -q "^$bdf *nvme .*no: bound to nvme" /tmp/dev1; then ok "devices: $(grep "^$bdf" /tmp/dev1 | tr -s ' ')"; else fail "devices before binding: $(cat /tmp/dev1)"; fi
  if out=$(/nvme-bind "$bdf" 2>&1); then ok "$out"; else fail "nvme-bind: $out"; fi
  /cfs-dataplane devices >/tmp/dev2 2>&1
  if grep -q "^$bdf *vfio-pci .* yes" /tmp/dev2; then ok "devices after nvme-bind: usable"; else fail "devices after binding: $(cat /tmp/dev2)"; fi
  RUST_BACKTRACE=1 /cfs-nvme-check "$bdf" || true

  # The data plane's chunk store on the userspace driver (two reactors, each with its own
  # queue pair on the controller): format, write (acknowledged writes logged), stop; each
  # check-load is a new process that recovers the store from the device and compares every
  # sector with the log.
  mkdir -p /tmp/cfs
  cat >/tmp/cfs.toml <<CONF
data_dir = "/tmp/cfs"
[[devices]]
pci = "$bdf"
[hugepages]
pool_mib = 16
buf_kib = 128
[reactors]
cores = [0, 1]
[server]
listen = "127.0.0.1:7411"
[format]
shards_per_device = 4
CONF
  if out=$(/cfs-dataplane format --config /tmp/cfs.toml 2>&1); then ok "format on vfio:$bdf: $(echo "$out" | grep -o 'formatted store.*' | head -1)"; else fail "format: $out"; fi
  if /cfs-dataplane load --config /tmp/cfs.toml --seed 7 --ops 3000 --chunks 8 >/tmp/load.log 2>/tmp/load.err &&
    out=$(/cfs-dataplane check-load --config /tmp/cfs.toml --log /tmp/load.log --chunks 8 2>&1); then
    ok "chunk store written (3000 writes) and verified after a restart: $(echo "$out" | tail -1)"
  else
    fail "load/check: $(tail -3 /tmp/load.err) $out"
  fi
  if /cfs-dataplane load --config /tmp/cfs.toml --seed 8 --ops 3000 --chunks 8 --first-id 100000 >>/tmp/load.log 2>/tmp/load.err &&
    out=$(/cfs-dataplane check-load --config /tmp/cfs.toml --log /tmp/load.log --chunks 8 2>&1); then
    ok "second run on the recovered store, verified again: $(echo "$out" | tail -1)"
  else
    fail "second load/check: $(tail -3 /tmp/load.err) $out"
  fi
  # The data plane serving its file-system RPC from the userspace driver: files written and
  # fsync'd through the RPC, the server killed with SIGKILL, restarted, the files read back.
  ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
  serve() {
    /cfs-dataplane run --config /tmp/cfs.toml >>/tmp/run.log 2>&1 &
    pid=$!
    n=0
    while ! grep -q "serving on" /tmp/run.log 2>/dev/null && [ $n -lt 120 ]; do sleep 0.5; n=$((n + 1)); done
  }
  : >/tmp/run.log
  serve
  if out=$(/cfs-dataplane rpc-check --server 127.0.0.1:7411 --files 4 --size 3000000 2>&1); then
    ok "cfs-dataplane run on vfio:$bdf serves its RPC: $out"
  else
    fail "rpc-check: $out $(tail -5 /tmp/run.log)"
  fi
  kill -9 "$pid"; wait "$pid" 2>/dev/null
  : >/tmp/run.log
  serve
  if out=$(/cfs-dataplane rpc-check --server 127.0.0.1:7411 --files 4 --size 3000000 --verify-only 2>&1); then
    ok "after SIGKILL and a restart (the controller reset by the new process): $out"
  else
    fail "rpc-check after SIGKILL: $out $(tail -5 /tmp/run.log)"
  fi
  kill -TERM "$pid"; wait "$pid" 2>/dev/null
  if out=$(/nvme-unbind "$bdf" 2>&1) && [ "$(basename "$(readlink /sys/bus/pci/devices/$bdf/driver)")" = nvme ]; then ok "$out"; else fail "nvme-unbind: $out"; fi
fi
echo "CFS-GUEST-END"
poweroff -f
INIT
chmod +x "$I/init"
(cd "$I" && find . | cpio -o -H newc 2>/dev/null | gzip -1 >"$WORK/initrd.gz")

truncate -s 256M "$WORK/disk.img"
# The benchmark reads data, not holes (QEMU answers reads of unallocated ranges without I/O).
[[ -n $BENCH ]] && dd if=/dev/urandom of="$WORK/disk.img" bs=1M count=256 status=none
echo "vfio: booting the guest (TCG; up to ${TIMEOUT_S} s)"
timeout -k 5 "$TIMEOUT_S" qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -cpu max -m 1024 -smp 2 \
  -nographic -no-reboot -kernel "$VMLINUZ" -initrd "$WORK/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 intel_iommu=on" -device intel-iommu \
  -device nvme,serial=cfs0,drive=nv0 -drive file="$WORK/disk.img",if=none,id=nv0,format=raw \
  -net none >"$WORK/guest.log" 2>&1 </dev/null &
QEMU_PID=$!
rc=0
wait "$QEMU_PID" || rc=$?
QEMU_PID=""
# SeaBIOS writes escape codes to the console: strip them.
sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g; s/\r$//' "$WORK/guest.log" >"$WORK/guest.txt"
if [[ -n $BENCH ]]; then
  grep "^BENCH" "$WORK/guest.txt" || { tail -30 "$WORK/guest.txt"; exit 1; }
  exit 0
fi
sed -n '/CFS-GUEST-BEGIN/,/CFS-GUEST-END/p' "$WORK/guest.txt" | grep -v "passed, [0-9]* failed$" | tee "$WORK/results.txt"
passed=$(grep -c "^ok " "$WORK/results.txt" || true)
failed=$(grep -c "^FAIL" "$WORK/results.txt" || true)
if ! grep -q "CFS-GUEST-END" "$WORK/guest.txt"; then
  ((rc == 124)) && echo "FAIL - the guest did not finish within ${TIMEOUT_S} s"
  echo "--- guest console (last 40 lines) ---"
  tail -40 "$WORK/guest.txt"
  failed=$((failed + 1))
fi
echo "$passed passed, $failed failed"
((failed == 0 && passed > 0))
