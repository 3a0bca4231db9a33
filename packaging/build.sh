#!/usr/bin/env bash
# Builds the .deb and .rpm packages of vmdk-plugin and vmdk-agent into
# target/packages/:
#
#   bash packaging/build.sh
#
# vmdk-plugin_VERSION_ARCH.deb   vmdk-plugin-VERSION-1.ARCH.rpm
# vmdk-agent_VERSION_ARCH.deb    vmdk-agent-VERSION-1.ARCH.rpm
#
# It builds both programs with `cargo build --release`, then packages them
# with the distributions' own tools: dpkg-deb and dpkg-shlibdeps (Debian's
# dpkg and dpkg-dev) and rpmbuild (Debian's rpm package). Nothing else is
# built or downloaded. What each package holds and says is in
# packaging/manifest.sh; the maintainer scripts are packaging/deb/PACKAGE/
# and packaging/rpm/.
#
# Options (mostly for the tests, tests/packaging.rs):
#   --profile NAME   package the binaries of cargo profile NAME (default
#                    release; `dev` means target/debug/)
#   --no-build       package binaries already built, do not run cargo build
#   --version V      package version instead of the crates' version (a
#                    rebuilt package for an upgrade test)
#   --out DIR        where the packages go (default target/packages)
#   --fast           faster, larger compression (gzip)
#   --format F       deb, rpm or both (default): on Photon OS, which has
#                    no dpkg, `--format rpm`
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

profile=release
build=1
version=
out=$root/target/packages
fast=
format=both
while (($#)); do
    case $1 in
    --profile) profile=$2; shift 2 ;;
    --no-build) build=; shift ;;
    --version) version=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --fast) fast=1; shift ;;
    --format) format=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "packaging/build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

case $format in
deb) tools=(dpkg-deb dpkg-shlibdeps) ;;
rpm) tools=(rpmbuild) ;;
both) tools=(dpkg-deb dpkg-shlibdeps rpmbuild) ;;
*) echo "packaging/build.sh: --format $format: use deb, rpm or both" >&2; exit 2 ;;
esac
missing=()
for tool in "${tools[@]}" strip; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "packaging/build.sh: ${missing[*]} not found (Debian: apt-get install dpkg-dev rpm binutils; Photon OS: tdnf install rpm-build binutils, and --format rpm)" >&2
    exit 1
fi

if [[ -z $version ]]; then
    # [workspace.package] version = "X.Y.Z" in the root Cargo.toml.
    version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)
    [[ -n $version ]] || { echo "packaging/build.sh: no [workspace.package] version in Cargo.toml" >&2; exit 1; }
fi
# Both formats take this version as it is: digits, letters, dots, plus and
# tilde (no hyphen, which both use to separate the release).
[[ $version =~ ^[0-9][0-9A-Za-z.+~]*$ ]] || {
    echo "packaging/build.sh: version $version is not valid for both .deb and .rpm (digits first, then letters, digits, . + ~)" >&2
    exit 2
}
release=1

if [[ -n $build ]]; then
    cargo build --profile "$profile" -p vmdk-plugin -p vmdk-agent --bin vmdk-plugin --bin vmdk-agent
fi
case $profile in
dev | test) bindir=target/debug ;;
*) bindir=target/$profile ;;
esac
for bin in vmdk-plugin vmdk-agent; do
    [[ -x $bindir/$bin ]] || {
        echo "packaging/build.sh: $bindir/$bin is missing (build it, or drop --no-build)" >&2
        exit 1
    }
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
stage=$(mktemp -d "${TMPDIR:-/tmp}/vmdk-package.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# shellcheck source=packaging/manifest.sh
source packaging/manifest.sh

# Fills $tree with the files of the current package for FORMAT (deb|rpm),
# and the lists files_bin/files_config/files_doc/files_all (destinations).
fill_tree() { # format tree
    local format=$1 tree=$2
    files_all=() files_config=() files_doc=() files_bin=() files_mode=()
    file() { # kind mode source destination [deb|rpm]
        local kind=$1 mode=$2 src=${3/@BIN@/$bindir} dest=$4 only=${5:-}
        [[ -z $only || $only == "$format" ]] || return 0
        if [[ $format == deb ]]; then dest=${dest/@UNITDIR@//lib/systemd/system}; else dest=${dest/@UNITDIR@//usr/lib/systemd/system}; fi
        [[ -f $src ]] || { echo "packaging/build.sh: $src (for $dest) is missing" >&2; exit 1; }
        mkdir -p "$tree$(dirname "$dest")"
        if [[ $kind == bin ]]; then
            strip --strip-debug -o "$tree$dest" "$src"
            files_bin+=("$dest")
        else
            cp "$src" "$tree$dest"
        fi
        chmod "$mode" "$tree$dest"
        files_all+=("$dest")
        files_mode+=("$mode")
        case $kind in
        config) files_config+=("$dest") ;;
        doc) files_doc+=("$dest") ;;
        bin | file) ;;
        *) echo "packaging/build.sh: unknown kind $kind in packaging/manifest.sh" >&2; exit 1 ;;
        esac
    }
    "package_${pkg//-/_}"
}

build_deb() {
    local tree=$stage/deb/$pkg
    mkdir -p "$tree/DEBIAN"
    fill_tree deb "$tree"
    # The shared libraries the binaries need, as Debian package
    # dependencies (what debhelper's ${shlibs:Depends} holds).
    local shl=$stage/shlibdeps/$pkg shlibs
    mkdir -p "$shl/debian"
    printf 'Source: vmdk\n\nPackage: %s\nArchitecture: any\n' "$pkg" >"$shl/debian/control"
    local bins=()
    for b in "${files_bin[@]}"; do bins+=("-e$tree$b"); done
    shlibs=$(cd "$shl" && dpkg-shlibdeps -O "${bins[@]}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
    local depends=${shlibs:+$shlibs, }$deb_depends
    local size deb_arch
    deb_arch=$(dpkg --print-architecture)
    size=$(du -sk --apparent-size --exclude=DEBIAN "$tree" | cut -f1)
    {
        echo "Package: $pkg"
        echo "Version: $version"
        echo "Architecture: $deb_arch"
        echo "Maintainer: $maintainer"
        echo "Installed-Size: $size"
        echo "Depends: $depends"
        [[ -z $deb_recommends ]] || echo "Recommends: $deb_recommends"
        echo "Section: admin"
        echo "Priority: optional"
        echo "Homepage: $homepage"
        echo "Description: $summary"
        sed 's/^$/./; s/^/ /' <<<"$description"
    } >"$tree/DEBIAN/control"
    if ((${#files_config[@]})); then printf '%s\n' "${files_config[@]}" >"$tree/DEBIAN/conffiles"; fi
    (cd "$tree" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$tree/DEBIAN/md5sums"
    for s in postinst prerm postrm; do
        if [[ -f packaging/deb/$pkg/$s ]]; then
            install -m 755 "packaging/deb/$pkg/$s" "$tree/DEBIAN/$s"
        fi
    done
    local z=(-Zxz)
    [[ -z $fast ]] || z=(-Zgzip -z1)
    dpkg-deb --root-owner-group "${z[@]}" --build "$tree" "$out/${pkg}_${version}_${deb_arch}.deb" >/dev/null
}

build_rpm() {
    local tree=$stage/rpmroot/$pkg spec=$stage/$pkg.spec
    mkdir -p "$tree"
    fill_tree rpm "$tree"
    {
        echo "Name: $pkg"
        echo "Version: $version"
        echo "Release: $release"
        echo "Summary: $summary"
        echo "License: $license"
        echo "URL: $homepage"
        echo "Packager: $maintainer"
        for r in $rpm_requires; do echo "Requires: $r"; done
        # The files are staged already (stripped above): no debuginfo
        # package, no rpm post-processing of them.
        echo '%global debug_package %{nil}'
        echo '%global __os_install_post %{nil}'
        echo '%global _build_id_links none'
        echo
        echo '%description'
        echo "$description"
        echo
        echo '%install'
        echo "cp -a '$tree/.' %{buildroot}/"
        echo
        echo '%files'
        local i f d
        # The directories only this package puts files in, so erasing it
        # removes them (the system's own, like /usr/bin, are not ours).
        for d in $(printf '%s\n' "${files_all[@]%/*}" | sort -u); do
            case $d in
            /usr/bin | /etc/default | /usr/lib/systemd/system | /usr/share/doc) ;;
            *) echo "%dir %attr(755,root,root) $d" ;;
            esac
        done
        for i in "${!files_all[@]}"; do
            f=${files_all[$i]}
            local attr="%attr(${files_mode[$i]},root,root)"
            if [[ " ${files_config[*]} " == *" $f "* ]]; then
                echo "%config(noreplace) $attr $f"
            elif [[ " ${files_doc[*]} " == *" $f "* ]]; then
                echo "%doc $attr $f"
            else
                echo "$attr $f"
            fi
        done
        for s in post preun postun; do
            if [[ -f packaging/rpm/$pkg-$s.sh ]]; then
                echo
                echo "%$s"
                cat "packaging/rpm/$pkg-$s.sh"
            fi
        done
    } >"$spec"
    local payload=w6.xzdio
    [[ -z $fast ]] || payload=w1.gzdio
    rpmbuild -bb --quiet \
        --define "_topdir $stage/rpmbuild" \
        --define "_rpmdir $out" \
        --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
        --define "_binary_payload $payload" \
        "$spec" >"$stage/rpmbuild.log" 2>&1 || {
        cat "$stage/rpmbuild.log" >&2
        echo "packaging/build.sh: rpmbuild of $pkg failed (spec: above)" >&2
        exit 1
    }
}

for pkg in vmdk-agent vmdk-plugin; do
    [[ $format == rpm ]] || build_deb
    [[ $format == deb ]] || build_rpm
done
shopt -s nullglob
printf '%s\n' "$out"/*.deb "$out"/*.rpm
