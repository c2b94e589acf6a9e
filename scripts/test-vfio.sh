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
set -euo pipefail
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
  rm -rf "$WORK"
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

# The check program, linked statically (the initrd has no C library).
echo "vfio: building cfs-nvme-check (static)"
(cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release \
  -p cfs-nvme --bin cfs-nvme-check --target x86_64-unknown-linux-gnu --target-dir "$ROOT/target/static")
CHECK=$ROOT/target/static/x86_64-unknown-linux-gnu/release/cfs-nvme-check
if readelf -d "$CHECK" | grep -q NEEDED; then echo "cfs-nvme-check is not static" >&2; exit 1; fi

# The initrd: busybox, the vfio modules (in load order), the check program, /init.
I=$WORK/initrd
mkdir -p "$I"/{bin,sbin,proc,sys,dev,tmp,mods}
cp "$BUSYBOX" "$I/bin/busybox"
for a in $("$BUSYBOX" --list); do
  [[ $a == busybox ]] && continue # a link named busybox to itself panics the guest
  ln -sf busybox "$I/bin/$a"
done
ORDER="irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci"
n=0
for m in $ORDER; do
  f=$(find "$MODS" -name "$m.ko*" | head -1)
  [[ -n $f ]] || continue # built in, or merged into vfio on newer kernels
  case $f in
    *.ko.xz) xz -dc "$f" >"$I/mods/$n-$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$I/mods/$n-$m.ko" ;;
    *) cp "$f" "$I/mods/$n-$m.ko" ;;
  esac
  n=$((n + 1))
done
cp "$CHECK" "$I/cfs-nvme-check"
cat >"$I/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /mods/*.ko; do insmod "$m" || echo "insmod $m failed"; done
bdf=""
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/class")" = "0x010802" ] && bdf=$(basename "$d") && break
done
if [ -z "$bdf" ]; then
  echo "CFS-GUEST no NVMe controller"
else
  echo vfio-pci >"/sys/bus/pci/devices/$bdf/driver_override"
  echo "$bdf" >/sys/bus/pci/drivers_probe
  echo "CFS-GUEST-BEGIN $bdf group $(basename "$(readlink "/sys/bus/pci/devices/$bdf/iommu_group")")"
  RUST_BACKTRACE=1 /cfs-nvme-check "$bdf"
  echo "CFS-GUEST-END rc=$?"
fi
poweroff -f
INIT
chmod +x "$I/init"
(cd "$I" && find . | cpio -o -H newc 2>/dev/null | gzip -1 >"$WORK/initrd.gz")

truncate -s 256M "$WORK/disk.img"
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
sed -n '/CFS-GUEST-BEGIN/,/CFS-GUEST-END/p' "$WORK/guest.txt"
if ! grep -q "CFS-GUEST-END rc=0" "$WORK/guest.txt"; then
  ((rc == 124)) && echo "FAIL - the guest did not finish within ${TIMEOUT_S} s"
  echo "--- guest console (last 40 lines) ---"
  tail -40 "$WORK/guest.txt"
  grep -q "passed, [0-9]* failed" "$WORK/guest.txt" || echo "0 passed, 1 failed"
  exit 1
fi
