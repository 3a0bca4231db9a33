#!/usr/bin/env bash
# The benchmark suite (issue 10, docs/performance.md#benchmarks). Not part of
# tests/run.sh. Run as root:
#
#   bash bench/run.sh                 # every group, full counts (about 20-30 min)
#   bash bench/run.sh --quick         # smaller counts, a smoke run (a few minutes)
#   bash bench/run.sh --groups mount,create
#   bash bench/run.sh --counts 10000  # control group at these volume counts only
#
# Groups: mount, create, control (control calls, memory, start-up and
# scaling at each volume count), concurrency, docker (Docker Engine; takes
# the Docker tests' lock). VMDK_BENCH_QUICK=1 is --quick; VMDK_BENCH_GROUPS
# is --groups.
#
# Builds the release binaries, prints each figure next to its target with
# PASS/FAIL, and writes target/bench/results.json (figures and the machine)
# and target/bench/run-<time>.log (and the results again as run-<time>.json).
# It needs what tests/run.sh installs (e2fsprogs, util-linux, busybox-static,
# Docker Engine) and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "bench/run.sh must run as root (loop devices, mkfs, mount, Docker)" >&2
    exit 1
fi

args=()
groups=${VMDK_BENCH_GROUPS:-}
[[ -z ${VMDK_BENCH_QUICK:-} ]] || args+=(--quick)
while (($#)); do
    case $1 in
    --quick) args+=(--quick) ;;
    --groups) groups=$2; shift ;;
    --groups=*) groups=${1#--groups=} ;;
    --counts) args+=(--counts "$2"); shift ;;
    --docker-volumes) args+=(--docker-volumes "$2"); shift ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "bench/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ -z $groups ]] || args+=(--groups "$groups")

for tool in losetup mkfs.ext4 mount umount truncate; do
    command -v "$tool" >/dev/null || { echo "bench/run.sh: $tool is missing (tests/run.sh installs it)" >&2; exit 1; }
done

echo "==> building release binaries"
cargo build --release --quiet -p vmdk-plugin -p vmdk-agent -p vmdk-bench --bin vmdk-plugin --bin vmdk-agent --bin vmdk-bench
bin=target/release

out=target/bench
mkdir -p "$out"

# The busybox image of the Docker Engine tests, when the docker group runs.
if [[ -z $groups || ,$groups, == *,docker,* ]]; then
    docker info >/dev/null 2>&1 || { echo "bench/run.sh: the docker group needs a running Docker Engine" >&2; exit 1; }
    image="vmdk-bench/busybox:$(sha256sum tests/images/build-image.sh | cut -c1-12)"
    if ! docker image inspect "$image" >/dev/null 2>&1; then
        echo "==> building image $image (tests/images/build-image.sh busybox)"
        bash tests/images/build-image.sh busybox "$image" >/dev/null
    fi
    args+=(--image "$image")
fi

json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1" 2>/dev/null || printf '"%s"' "$1"; }
cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
mem=$(awk '/MemTotal/ {print $2}' /proc/meminfo)
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -q . && echo true || echo false)
machine=$(printf '{"nproc": %s, "mem_kib": %s, "kernel": %s, "cpu": %s, "commit": "%s", "dirty": %s, "date": "%s", "loadavg_start": %s, "fs": %s}' \
    "$(nproc)" "$mem" "$(json_str "$(uname -r)")" "$(json_str "$cpu")" "$commit" "$dirty" \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(json_str "$(cut -d' ' -f1-3 /proc/loadavg)")" \
    "$(json_str "$(df -T target | awk 'NR==2 {print $1" "$2}')")")
echo "==> machine: $machine"

log=$out/run-$(date -u +%Y%m%dT%H%M%SZ).log
start=$SECONDS
# The scratch directory sits on the same filesystem as a real datastore
# would (not tmpfs), so fsyncs cost what they cost.
"$bin/vmdk-bench" --plugin "$bin/vmdk-plugin" --agent "$bin/vmdk-agent" \
    --work /var/tmp/vmdk-bench --out "$out/results.json" --machine "$machine" "${args[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
cp "$out/results.json" "${log%.log}.json" 2>/dev/null || true
echo "==> bench took $((SECONDS - start)) s; load average now $(cut -d' ' -f1-3 /proc/loadavg); log $log"
exit "$rc"
