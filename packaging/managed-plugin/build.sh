#!/usr/bin/env bash
# Builds the managed (v2) plugin bundle that `docker plugin create` takes:
# OUT/config.json and OUT/rootfs/.
#
#   packaging/managed-plugin/build.sh [--binary PATH] [--out DIR]
#
#   --binary  the vmdk-plugin to ship (default target/release/vmdk-plugin;
#             its debug info is stripped in the copy)
#   --out     where to put the bundle (default target/managed-plugin/bundle)
#
# The rootfs is made of whole Debian packages, unpacked with `dpkg -x`: the
# ones that own the filesystem tools the plugin runs (mkfs.ext4, mkfs.xfs,
# blkid) and every shared library those tools and the plugin load, at the
# archive's versions (`apt-get download` fetches them), plus the plugin
# binary. Then:
#
#   docker plugin create vmdk OUT
#   docker plugin enable --timeout 120 vmdk
#
# See docs/managed-plugin.md. Needs root (apt-get) the first time a package
# is missing; downloads are cached in target/managed-plugin/debs.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/target/release/vmdk-plugin
out=$root/target/managed-plugin/bundle
while (($#)); do
    case $1 in
    --binary) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2 ;;
    esac
done
say() { echo "managed-plugin: $*" >&2; }
[[ -x $bin ]] || { echo "no plugin binary at $bin (cargo build --release first, or --binary)" >&2; exit 1; }

need=()
for pkg in e2fsprogs xfsprogs util-linux binutils; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if ((${#need[@]})); then
    say "installing ${need[*]}"
    apt-get update -qq -o DPkg::Lock::Timeout=600
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null
fi

# The package owning a file; Debian 12 merged /usr, so the database may name
# it with or without the /usr prefix.
owner() {
    local f=$1 p
    for p in "$f" "${f#/usr}" "/usr$f"; do
        if dpkg-query -S "$p" >/dev/null 2>&1; then
            dpkg-query -S "$p" | head -1 | cut -d: -f1
            return
        fi
    done
    echo "no Debian package owns $f" >&2
    return 1
}

tools=()
for t in mkfs.ext4 mke2fs mkfs.xfs blkid; do
    tools+=("$(command -v "$t")")
done
files=("${tools[@]}")
for exe in "$bin" "${tools[@]}"; do
    while read -r lib; do
        [[ -n $lib ]] && files+=("$(readlink -f "$lib")")
    done < <(ldd "$exe" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
done
pkgs=()
for f in "${files[@]}"; do
    pkgs+=("$(owner "$(readlink -f "$f")")")
done
mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
say "packages: ${pkgs[*]}"

debs=$root/target/managed-plugin/debs
mkdir -p "$debs"
rm -rf "$out"
mkdir -p "$out/rootfs"
for pkg in "${pkgs[@]}"; do
    name=${pkg%%:*}
    arch=$(dpkg-query -W -f='${Architecture}' "$pkg")
    # The archive's version (the installed one may be gone from it).
    ver=$(apt-cache policy "$name:$arch" | awk '/Candidate:/ {print $2}')
    if [[ -z $ver || $ver == "(none)" ]]; then
        echo "the Debian archive has no $name:$arch (apt-get update?)" >&2
        exit 1
    fi
    file=$debs/${name}_${ver//:/%3a}_$arch.deb
    if [[ ! -f $file ]]; then
        (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "$name:$arch=$ver" >/dev/null) || {
            echo "cannot download $name=$ver from the Debian archive" >&2
            exit 1
        }
    fi
    dpkg -x "$file" "$out/rootfs"
done

install -D -m 0755 "$bin" "$out/rootfs/usr/bin/vmdk-plugin"
objcopy --strip-debug "$out/rootfs/usr/bin/vmdk-plugin"
# Debian 12 puts /sbin and /lib under /usr; the packages' files are where
# dpkg -x put them, and the usual links make both paths work.
for d in bin sbin lib lib64; do
    [[ -e $out/rootfs/$d ]] || { [[ -d $out/rootfs/usr/$d ]] && ln -s "usr/$d" "$out/rootfs/$d"; } || true
done
mkdir -p "$out/rootfs"/{dev,proc,sys,tmp,run/docker/plugins,mnt/vmdk,etc/vmdk,var/lib/vmdk,var/lib/vmdk-plugin,var/run}
chmod 1777 "$out/rootfs/tmp"
cp "$root/packaging/managed-plugin/config.json" "$out/config.json"
# The plugin finds its tools on PATH.
for t in mkfs.ext4 mkfs.xfs blkid; do
    found=
    for d in usr/sbin sbin usr/bin bin; do
        [[ -x $out/rootfs/$d/$t ]] && found=1
    done
    [[ -n $found ]] || { echo "the rootfs lacks $t" >&2; exit 1; }
done
say "bundle in $out ($(du -sh "$out" | cut -f1))"
echo "$out"
