#!/usr/bin/env bash
# The one command that runs every test: formatting, lints, unit and property
# tests, root-only tests (loop devices, mkfs, mount), real-guest-kernel tests
# under QEMU, the Docker Engine tests and a bounded run of the fuzz targets
# (tests/fuzz.sh).
# It installs what it needs from Debian's packages first. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "tests/run.sh must run as root (loop devices, mount, Docker)" >&2
    exit 1
fi

need=()
# docker-registry and postgresql only provide files for the Docker Engine
# tests' images (tests/images/build-image.sh); their services are not used.
# golang-go and golang-github-vmware-govmomi-dev build the vSphere simulator
# (tests/vcsim/build.sh) for the vSphere client's tests and
# tests/vsphere_guest.rs, which also needs qemu-img (qemu-utils).
# systemd (systemd-socket-activate, systemd-analyze), init-system-helpers
# (deb-systemd-helper), dpkg-dev (dpkg-shlibdeps) and rpm (rpmbuild) serve
# the socket-activation and packaging tests (tests/socket_activation.rs,
# tests/packaging.rs, packaging/build.sh). g++ builds
# libFuzzer for tests/fuzz.sh (installed here, not by fuzz.sh in the
# background, where it would race tests/packaging.rs for dpkg's lock).
for pkg in e2fsprogs xfsprogs util-linux busybox-static qemu-utils docker-compose docker-registry postgresql \
    golang-go golang-github-vmware-govmomi-dev systemd init-system-helpers dpkg-dev rpm g++; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "==> installing ${need[*]}"
    # Keep maintainer scripts from starting services (a PostgreSQL cluster,
    # a registry) on this host: the standard policy-rc.d "deny" answer.
    policy=/usr/sbin/policy-rc.d
    own_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
    fi
    rc=0
    { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } || rc=$?
    [[ -z $own_policy ]] || rm -f "$policy"
    ((rc == 0)) || exit "$rc"
fi

# pyvmomi (PyPI) for tests/vcsim/inspect.py, the vSphere tests' independent checker.
bash tests/vcsim/pyvmomi.sh

if ! docker info >/dev/null 2>&1; then
    echo "==> starting dockerd"
    dockerd=$(command -v dockerd || echo /usr/sbin/dockerd)
    (setsid "$dockerd" >>/var/log/dockerd.log 2>&1 &)
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "Docker Engine is not available" >&2; exit 1; }
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The real-guest-kernel tests (tests/guest_kernel.rs, tests/vsphere_guest.rs,
# tests/vsphere_plugin_guest.rs) boot QEMU guests:
# tests/guest/build.sh installs QEMU and builds the kernel and initramfs
# (cached in target/guest/), and the locator and the Docker stand-in they
# run in the guest are examples, which `cargo test` builds only in test mode.
start=$SECONDS
echo "==> guest image (tests/guest/build.sh) and the guest examples"
bash tests/guest/build.sh >/dev/null
cargo build --quiet --example locate --example docker_call
echo "==> guest image and examples took $((SECONDS - start)) s"
# Every test binary runs even when one fails; the failures are reported at
# the end and the command fails.
failed=()
# The fuzz targets' release build (about 3 CPU-minutes, its own target
# directory fuzz/target) goes alongside the tests, many of which wait on
# Docker, QEMU or the disk.
echo "==> fuzz targets' build (tests/fuzz.sh), in the background"
mkdir -p target
VMDK_FUZZ_BUILD_ONLY=1 bash tests/fuzz.sh >target/fuzz-build.log 2>&1 &
fuzz_build_pid=$!
start=$SECONDS
echo "==> cargo test (unit, property, root-only, hostile-datastore and Docker Engine tests)"
cargo test --workspace --all-targets --no-fail-fast -- --test-threads=2 "$@" || failed+=("cargo test")
echo "==> cargo test took $((SECONDS - start)) s"
# (A failed build is built and reported again by the run below.)
wait "$fuzz_build_pid" || true
echo "==> fuzz targets' build:"
sed 's/^/    /' target/fuzz-build.log
start=$SECONDS
echo "==> fuzz targets, bounded (tests/fuzz.sh; VMDK_FUZZ_SECONDS=${VMDK_FUZZ_SECONDS:-96})"
bash tests/fuzz.sh || failed+=("fuzzing")
echo "==> fuzzing took $((SECONDS - start)) s"
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (see the output above)" >&2
    exit 1
fi
echo "==> all tests passed"
