#!/usr/bin/env bash
# Builds the vSphere simulator used by the vSphere client's tests
# (tests/vcsim/main.go) from Debian's golang-go and
# golang-github-vmware-govmomi-dev, in GOPATH mode (no Go module download).
# Installs those packages first when they are missing (needs root).
# The binary goes to ${CARGO_TARGET_DIR:-target}/vcsim/vcsim and is rebuilt
# only when main.go or this script is newer. Progress goes to stderr; the
# binary's path is the one line on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target = /* ]] || target=$repo/$target
out=$target/vcsim
bin=$out/vcsim
start=$SECONDS
mkdir -p "$out"

# One build at a time (several test binaries may ask at once).
exec 9>"$out/.lock"
flock 9

need=()
for pkg in golang-go golang-github-vmware-govmomi-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "vcsim: installing ${need[*]}" >&2
    if [[ $(id -u) -ne 0 ]]; then
        echo "vcsim: ${need[*]} missing and not root: install them with apt-get" >&2
        exit 1
    fi
    { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } || {
        echo "vcsim: could not install ${need[*]} from Debian's packages" >&2
        exit 1
    }
fi
if [[ ! -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]]; then
    echo "vcsim: /usr/share/gocode has no govmomi simulator (golang-github-vmware-govmomi-dev)" >&2
    exit 1
fi

if [[ -x $bin && $bin -nt $here/main.go && $bin -nt $here/build.sh ]]; then
    echo "vcsim: $bin is up to date" >&2
else
    echo "vcsim: building $bin" >&2
    # GOPATH mode: our package under a private GOPATH, govmomi from Debian's.
    gopath=$out/gopath
    rm -rf "$gopath"
    mkdir -p "$gopath/src/vcsim"
    cp "$here/main.go" "$gopath/src/vcsim/"
    (cd "$gopath/src/vcsim" &&
        GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$gopath:/usr/share/gocode" \
            GOCACHE="$out/gocache" go build -o "$bin.tmp" .)
    mv -f "$bin.tmp" "$bin"
fi
echo "vcsim: ready in $((SECONDS - start)) s" >&2
echo "$bin"
