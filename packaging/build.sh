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
# with cargo-deb and cargo-generate-rpm (metadata in the crates' Cargo.toml,
# [package.metadata.deb] and [package.metadata.generate-rpm]). Those two
# tools are installed, pinned, into ~/.cache/vmdk/packaging-tools/ the first
# time (about 4 minutes of CPU; later runs reuse them).
#
# Options (mostly for the tests, tests/packaging.rs):
#   --profile NAME   package the binaries of cargo profile NAME (default
#                    release; `dev` means target/debug/)
#   --no-build       package binaries already built, do not run cargo build
#   --version V      package version instead of the crates' version (a
#                    rebuilt package for an upgrade test)
#   --out DIR        where the packages go (default target/packages)
#   --fast           faster, larger compression
#   --tools-only     only install cargo-deb and cargo-generate-rpm
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

profile=release
build=1
version=
out=$root/target/packages
fast=
tools_only=
while (($#)); do
    case $1 in
    --profile) profile=$2; shift 2 ;;
    --no-build) build=; shift ;;
    --version) version=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --fast) fast=1; shift ;;
    --tools-only) tools_only=1; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "packaging/build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

# The tools, pinned and built once into $VMDK_PACKAGING_TOOLS (default
# ~/.cache/vmdk/packaging-tools, outside the work tree, so a fresh clone on
# the same machine, like CI's, reuses them). Built with little optimisation: they
# only copy and compress a few files, and this halves their build time.
# cargo-deb without its default lzma feature: no C library to build, gzip
# compression (dpkg and apt read it).
tools=${VMDK_PACKAGING_TOOLS:-${HOME:-/root}/.cache/vmdk/packaging-tools}
export PATH=$tools/bin:$PATH
install_tool() { # name version [cargo install flags...]
    local name=$1 want=$2
    shift 2
    if [[ -x $tools/bin/$name ]] && [[ $("$tools/bin/$name" --version 2>/dev/null) == *"$want"* ]]; then
        return
    fi
    echo "==> installing $name $want into $tools (once)" >&2
    local start=$SECONDS
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_DEBUG=0 \
        CARGO_PROFILE_RELEASE_LTO=false \
        cargo install --quiet --locked --version "$want" --root "$tools" --target-dir "$tools/build" "$@" "$name"
    echo "==> $name took $((SECONDS - start)) s" >&2
}
# One installer at a time: tests/run.sh installs them in the background while
# the tests run, and tests/packaging.rs's build waits here until that is done.
# (tests/run.sh takes this lock itself and hands it to its background run,
# which says so with VMDK_PACKAGING_TOOLS_LOCKED=1.)
if [[ -z ${VMDK_PACKAGING_TOOLS_LOCKED:-} ]]; then
    mkdir -p "$(dirname "$tools")"
    exec 8>"$tools.lock"
    flock 8
fi
install_tool cargo-deb "$CARGO_DEB_VERSION" --no-default-features --features gzip
install_tool cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION"
exec 8>&- 9>&-
[[ -z $tools_only ]] || exit 0

if [[ -n $build ]]; then
    cargo build --profile "$profile" -p vmdk-plugin -p vmdk-agent --bin vmdk-plugin --bin vmdk-agent
fi
case $profile in
dev | test) dir=debug ;;
*) dir=$profile ;;
esac
for bin in vmdk-plugin vmdk-agent; do
    [[ -x target/$dir/$bin ]] || {
        echo "packaging/build.sh: target/$dir/$bin is missing (build it, or drop --no-build)" >&2
        exit 1
    }
done

mkdir -p "$out"
# cargo-deb strips the binaries itself; cargo-generate-rpm takes them from a
# staging target directory with stripped copies.
stage=$(mktemp -d "${TMPDIR:-/tmp}/vmdk-package.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$dir"
for bin in vmdk-plugin vmdk-agent; do
    strip --strip-debug -o "$stage/$dir/$bin" "target/$dir/$bin"
done
deb_flags=(--no-build --strip --profile "$profile" --output "$out")
[[ -z $version ]] || deb_flags+=(--deb-version "$version")
[[ -z $fast ]] || deb_flags+=(--fast)
rpm_flags=(--profile "$profile" --target-dir "$stage" --output "$out")
[[ -z $version ]] || rpm_flags+=(--set-metadata "version = \"$version\"")
[[ -z $fast ]] || rpm_flags+=(--payload-compress gzip)
for pkg in vmdk-plugin vmdk-agent; do
    cargo deb -p "$pkg" "${deb_flags[@]}" >/dev/null
    cargo generate-rpm -p "$([[ $pkg == vmdk-plugin ]] && echo . || echo esxi-agent)" "${rpm_flags[@]}"
done
ls -1 "$out"/*.deb "$out"/*.rpm
