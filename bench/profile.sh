#!/usr/bin/env bash
# Where the time and memory of a missed target go (docs/performance.md,
# "Where the misses come from"). Run as root after bench/run.sh has built
# the release binaries; needs strace, curl, python3 and, for `list`, perf
# (optional).
#
#   bash bench/profile.sh mount    # strace -f -T timeline of Create, fresh Mount, Unmount
#   bash bench/profile.sh list     # syscalls and perf profile of List and `vmdk-agent ls` at 10,000 volumes
#   bash bench/profile.sh memory   # plugin RSS after Lists, default malloc vs MALLOC_ARENA_MAX=1
#
# Scratch data goes to /var/tmp/vmdk-profile and is removed.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: bench/profile.sh mount|list|memory}
P=target/release/vmdk-plugin
A=target/release/vmdk-agent
[[ -x $P && -x $A ]] || { echo "build first: bash bench/run.sh --quick (or cargo build --release)" >&2; exit 1; }
D=/var/tmp/vmdk-profile
rm -rf "$D"
mkdir -p "$D/ds"
pid=
start() {
    env "$@" VMDK_LOG=warn "$P" serve --socket "$D/s" --datastore "local=$D/ds" --vm-id profile \
        --mount-root "$D/mnt" --state-dir "$D/st" --docker-socket "$D/none" --reconcile-interval 0 >>"$D/log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do call Capabilities '{}' >/dev/null 2>&1 && return; sleep 0.05; done
    echo "plugin did not start; $D/log:" >&2; cat "$D/log" >&2; exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null; }
call() { curl -sf -o /dev/null -w "$1 %{time_total}s\n" --unix-socket "$D/s" -XPOST "http://plugin/VolumeDriver.$1" -d "$2"; }
trap '[[ -z $pid ]] || kill "$pid" 2>/dev/null; umount "$D"/mnt/* 2>/dev/null; rm -rf "$D"' EXIT
# 10,000 volumes: one made by the plugin, copied with its name changed.
populate() {
    call Create '{"Name":"tpl","Opts":{"size":"1gb"}}' >/dev/null
    python3 - "$D/ds/dockvols/_DEFAULT" <<'PY'
import os, sys
d = sys.argv[1]
desc = open(f"{d}/tpl.vmdk").read()
meta = open(f"{d}/tpl.vmfd").read()
for i in range(9999):
    n = f"w{i:05d}"
    open(f"{d}/{n}.vmdk", "w").write(desc.replace("tpl-flat.vmdk", f"{n}-flat.vmdk"))
    open(f"{d}/{n}.vmfd", "w").write(meta)
    with open(f"{d}/{n}-flat.vmdk", "w") as f:
        f.truncate(1 << 30)
for f in os.listdir(d):
    os.chmod(f"{d}/{f}", 0o600)
PY
}
ID=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef

case $what in
mount)
    start
    call Create '{"Name":"p1","Opts":{"size":"1gb"}}'
    strace -f -tt -T -p "$pid" -e trace=execve,fsync,fdatasync,mount,umount2,ioctl -e signal=none -o "$D/trace" 2>/dev/null &
    s=$!
    sleep 0.5
    call Mount "{\"Name\":\"p1\",\"ID\":\"$ID\"}"
    call Unmount "{\"Name\":\"p1\",\"ID\":\"$ID\"}"
    sleep 0.2
    kill -INT $s
    wait $s 2>/dev/null
    grep -E 'execve|fsync|fdatasync|mount|exited' "$D/trace" | grep -v resumed | cut -c1-160
    echo "fsyncs: $(grep -cE ' (fsync|fdatasync)\(' "$D/trace") (mkfs.ext4's included)"
    stop
    ;;
list)
    start
    populate
    for _ in 1 2 3; do call List '{}'; done
    strace -c -w -f -p "$pid" -o "$D/c.list" 2>/dev/null &
    s=$!
    sleep 0.4
    call List '{}'
    sleep 0.2
    kill -INT $s
    wait $s 2>/dev/null
    echo "--- strace -c -w over one List (under strace, so slower)"
    head -14 "$D/c.list"
    if command -v perf >/dev/null; then
        perf record -q -g -o "$D/perf.data" -p "$pid" 2>/dev/null &
        s=$!
        sleep 0.5
        call List '{}'
        call List '{}'
        sleep 0.2
        kill -INT $s
        wait $s 2>/dev/null
        echo "--- perf over two Lists"
        perf report -i "$D/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null | grep -E '^ +[0-9.]+%' | head -15 | cut -c1-120
    fi
    echo "--- threads: $(ls /proc/$pid/task | wc -l)"
    stop
    printf 'socket = "%s/a.sock"\n[[datastore]]\nname = "local"\npath = "%s/ds"\n' "$D" "$D" >"$D/agent.toml"
    for _ in 1 2 3; do /usr/bin/time -f "vmdk-agent ls: %e s, %M KiB peak RSS" "$A" --config "$D/agent.toml" ls >/dev/null; done
    strace -c -w -f -o "$D/c.ls" "$A" --config "$D/agent.toml" ls >/dev/null
    echo "--- strace -c -w of vmdk-agent ls"
    head -12 "$D/c.ls"
    ;;
memory)
    start
    populate
    stop
    for env in VMDK_PROFILE=default MALLOC_ARENA_MAX=1; do
        start "$env"
        sleep 0.5
        idle=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
        for _ in $(seq 30); do call List '{}' >/dev/null; done
        after=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
        hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
        echo "${env}: RSS idle $((idle / 1024)) MiB, after 30 Lists $((after / 1024)) MiB (peak $((hwm / 1024)) MiB), threads $(ls /proc/$pid/task | wc -l)"
        stop
    done
    ;;
*)
    echo "usage: bench/profile.sh mount|list|memory" >&2
    exit 2
    ;;
esac
