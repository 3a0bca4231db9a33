#!/usr/bin/env bash
# Builds what the real-guest-kernel tests boot under QEMU (TCG): Debian 12's
# cloud kernel and an initramfs with busybox, the PVSCSI and virtio-net
# modules, mkfs.ext4/mkfs.xfs/blkid/e2fsck, and any extra programs given.
#
#   tests/guest/build.sh [EXTRA_PROGRAM...]
#
# Each EXTRA_PROGRAM (e.g. target/debug/vmdk-plugin) is copied, without its
# debug info, to /bin/<name> in the guest together with the libraries `ldd`
# lists. On success the last two lines of stdout are
#   KERNEL=<path>
#   INITRD=<path>
# (absolute paths). Progress and timings go to stderr.
#
# It installs what it needs from Debian's packages first: qemu-system-x86
# and qemu-utils in one step and at one version (installing qemu-system-x86
# replaces the backports qemu-utils 10.0 with Debian 12's 7.2), socat,
# busybox-static, e2fsprogs, xfsprogs, kmod. The kernel package is
# downloaded and unpacked, never installed. Everything is cached under
# target/guest/ and rebuilt only when an input changes; concurrent runs
# serialize on target/guest/.lock. See docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=$root/target/guest
mkdir -p "$out"

if [[ $(id -u) -ne 0 ]]; then
    echo "tests/guest/build.sh must run as root (apt-get)" >&2
    exit 1
fi

t0=$(date +%s%N)
ms() { echo $((($(date +%s%N) - $1) / 1000000)); }
say() { echo "guest/build: $*" >&2; }

exec 9>"$out/.lock"
flock 9

# -- packages -------------------------------------------------------------
t=$(date +%s%N)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
need=()
for pkg in socat busybox-static e2fsprogs xfsprogs kmod binutils; do
    installed "$pkg" || need+=("$pkg")
done
qsys=$(installed qemu-system-x86 && version qemu-system-x86 || true)
qutil=$(installed qemu-utils && version qemu-utils || true)
updated=
if [[ -z $qsys || $qsys != "$qutil" ]]; then
    apt-get update -qq -o DPkg::Lock::Timeout=600
    updated=1
    want=${qsys:-$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')}
    if [[ -z $want || $want == "(none)" ]]; then
        echo "qemu-system-x86 is not available from the configured Debian archives" >&2
        exit 1
    fi
    need+=("qemu-system-x86=$want" "qemu-utils=$want")
fi
if ((${#need[@]})); then
    say "installing ${need[*]}"
    [[ -n $updated ]] || apt-get update -qq -o DPkg::Lock::Timeout=600
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
        -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null
    say "packages installed in $(ms "$t") ms"
fi

# qemu-img (now from the same QEMU as qemu-system-x86) must still read the
# agent's ESXi layout: a vmfs descriptor next to its flat extent.
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
truncate -s 1M "$check/d-flat.vmdk"
cat >"$check/d.vmdk" <<'VMDK'
# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
isNativeSnapshot="no"
createType="vmfs"

# Extent description
RW 2048 VMFS "d-flat.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.uuid = "60 00 c2 9a bc de f0 12-34 56 78 9a bc de f0 12"
ddb.virtualHWVersion = "13"
VMDK
if ! qemu-img info --output=json "$check/d.vmdk" | grep -q '"virtual-size": 1048576'; then
    echo "qemu-img $(version qemu-utils) does not read a vmfs descriptor:" >&2
    qemu-img info "$check/d.vmdk" >&2 || true
    exit 1
fi

# -- kernel ---------------------------------------------------------------
# The kernel first unpacked here stays in use (target/guest/kernel/current)
# until target/guest is removed: asking apt which one is current costs a
# second on every run.
t=$(date +%s%N)
kver=$(cat "$out/kernel/current" 2>/dev/null || true)
if [[ -z $kver || ! -e $out/kernel/$kver/.done ]]; then
    kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [[ -z $kpkg ]]; then
        apt-get update -qq -o DPkg::Lock::Timeout=600
        kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    kver=${kpkg#linux-image-}
fi
kpkg=linux-image-$kver
kdir=$out/kernel/$kver
if [[ ! -e $kdir/.done ]]; then
    say "downloading $kpkg"
    rm -rf "$kdir" "$out/dl"
    mkdir -p "$out/dl" "$kdir"
    (cd "$out/dl" && apt-get download -qq "$kpkg" 2>/dev/null) ||
        (apt-get update -qq -o DPkg::Lock::Timeout=600 && cd "$out/dl" && apt-get download -qq "$kpkg")
    dpkg-deb -x "$out"/dl/"$kpkg"_*.deb "$kdir"
    rm -rf "$out/dl"
    depmod -b "$kdir" "$kver"
    touch "$kdir/.done"
    say "kernel $kver unpacked in $(ms "$t") ms"
fi
echo "$kver" >"$out/kernel/current"
kernel=$kdir/boot/vmlinuz-$kver

# -- base initramfs: busybox, modules, file system tools -------------------
# The modules the guest loads, dependencies first (modprobe resolves them;
# virtio_pci is no dependency of virtio_net, so it is named).
modules="scsi_common scsi_mod vmw_pvscsi sd_mod virtio_ring virtio virtio_pci_modern_dev
virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net xfs"
tools="/bin/busybox $(command -v mke2fs) $(command -v mkfs.ext4) $(command -v mkfs.xfs)
$(command -v blkid) $(command -v e2fsck)"

# The libraries programs load (ldd), one path a line.
libs() {
    local f
    for f in "$@"; do
        ldd "$f" 2>/dev/null | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}' || true
    done | sort -u
}
fingerprint() { # content identity of files, cheap: path, size, mtime
    local f
    for f in "$@"; do stat -L -c '%n %s %Y' "$f"; done
}

base_key=$({
    cat "$0" "$root/tests/guest/init" | sha256sum
    echo "$kver"
    fingerprint $tools $(libs $tools)
} | sha256sum | cut -c1-16)
base=$out/base-$base_key.cpio
if [[ ! -e $base ]]; then
    t=$(date +%s%N)
    stage=$(mktemp -d "$out/stage.XXXXXX")
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,run,etc,lib/modules}
    cp /bin/busybox "$stage/bin/busybox"
    # The tools go to /sbin under their names (ahead of busybox's applets
    # in the guest's PATH); libraries go where ldd found them.
    for f in $tools; do
        [[ $f == /bin/busybox ]] || cp -L "$f" "$stage/sbin/$(basename "$f")"
    done
    for f in $(libs $tools); do
        mkdir -p "$stage$(dirname "$f")"
        cp -L "$f" "$stage$f"
    done
    # Modules in load order, uncompressed, flat.
    : >"$stage/etc/modules"
    for m in $modules; do
        modprobe -d "$kdir" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
    done | awk '!seen[$0]++' | while read -r ko; do
        name=$(basename "$ko")
        case $name in
            *.ko.xz) xz -dc "$ko" >"$stage/lib/modules/${name%.xz}"; name=${name%.xz} ;;
            *.ko.zst) zstd -qdc "$ko" >"$stage/lib/modules/${name%.zst}"; name=${name%.zst} ;;
            *) cp "$ko" "$stage/lib/modules/$name" ;;
        esac
        echo "$name" >>"$stage/etc/modules"
    done
    cp "$root/tests/guest/init" "$stage/init"
    chmod 0755 "$stage/init"
    echo "$kver" >"$stage/etc/kernel-release"
    (cd "$stage" && find . | sort | busybox cpio -o -H newc 2>/dev/null) >"$base.tmp"
    mv "$base.tmp" "$base"
    rm -rf "$stage"
    # Older bases are of no further use.
    find "$out" -maxdepth 1 -name 'base-*.cpio' ! -name "base-$base_key.cpio" -delete
    say "base initramfs ($(du -h "$base" | cut -f1)) built in $(ms "$t") ms"
fi

# -- extra programs: a second cpio, appended ------------------------------
# (the kernel unpacks concatenated newc archives in order).
initrd=$base
if (($#)); then
    extras=()
    for f in "$@"; do
        [[ -f $f && -x $f ]] || { echo "not an executable file: $f" >&2; exit 1; }
        extras+=("$(realpath "$f")")
    done
    key=$({
        echo "$base_key"
        fingerprint "${extras[@]}"
        fingerprint $(libs "${extras[@]}")
    } | sha256sum | cut -c1-16)
    initrd=$out/initrd-$key.cpio
    if [[ ! -e $initrd ]]; then
        t=$(date +%s%N)
        stage=$(mktemp -d "$out/stage.XXXXXX")
        mkdir -p "$stage/bin"
        for f in "${extras[@]}"; do
            strip --strip-debug -o "$stage/bin/$(basename "$f")" "$f"
        done
        for f in $(libs "${extras[@]}"); do
            mkdir -p "$stage$(dirname "$f")"
            cp -L "$f" "$stage$f"
        done
        { cat "$base"; (cd "$stage" && find . -mindepth 1 | sort | busybox cpio -o -H newc 2>/dev/null); } >"$initrd.tmp"
        mv "$initrd.tmp" "$initrd"
        rm -rf "$stage"
        # Initrds of earlier builds, unless another test may still be about
        # to boot one (QEMU reads it whole at start-up).
        find "$out" -maxdepth 1 -name 'initrd-*.cpio' -mmin +30 -delete
        say "initramfs with ${extras[*]##*/} ($(du -h "$initrd" | cut -f1)) built in $(ms "$t") ms"
    else
        touch "$initrd" # in use: not pruned by another build
    fi
fi

say "ready in $(ms "$t0") ms"
echo "KERNEL=$kernel"
echo "INITRD=$initrd"
