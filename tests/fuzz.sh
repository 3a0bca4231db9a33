#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder of hostile bytes (fuzz/), for a
# bounded time, on the stable toolchain: libFuzzer from the libfuzzer-sys
# crate, with rustc's stable SanitizerCoverage flags (what cargo-fuzz passes,
# minus the nightly-only -Zsanitizer). See docs/testing.md.
#
#   VMDK_FUZZ_SECONDS   total run time over the chosen targets, in CPU
#                       seconds (default 96: 12 s per target)
#   VMDK_FUZZ_JOBS      targets fuzzed at once (default 2, one per CPU here)
#   VMDK_FUZZ_TARGETS   targets to run, space-separated (default: all)
#   VMDK_FUZZ_FEATURES  cargo features of fuzz/ (none today)
#   VMDK_FUZZ_BUILD_ONLY  set: build the targets and stop
#
# Exits non-zero, printing each crashing or hanging input in hex and base64,
# if any target fails. Inputs found along the way are kept in
# fuzz/target/corpus/<target>/ (not committed) so later runs go deeper.
set -euo pipefail
cd "$(dirname "$0")/.."

all=(docker_request agent_request name_and_options policy_expr descriptor sidecar plugin_state mountinfo)
read -r -a targets <<<"${VMDK_FUZZ_TARGETS:-${all[*]}}"
for t in "${targets[@]}"; do
    [[ " ${all[*]} " == *" $t "* ]] || { echo "unknown fuzz target $t; targets: ${all[*]}" >&2; exit 2; }
done
total=${VMDK_FUZZ_SECONDS:-96}
jobs=${VMDK_FUZZ_JOBS:-2}
[[ $jobs =~ ^[1-9][0-9]*$ ]] || { echo "VMDK_FUZZ_JOBS must be a positive whole number, not $jobs" >&2; exit 2; }
[[ $total =~ ^[0-9]+$ ]] || { echo "VMDK_FUZZ_SECONDS must be a whole number of seconds, not $total" >&2; exit 2; }
per=$((total / ${#targets[@]}))
((per >= 1)) || per=1

# libfuzzer-sys compiles libFuzzer's C++ sources: it needs a C++ compiler.
if ! command -v c++ >/dev/null 2>&1; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "tests/fuzz.sh needs a C++ compiler (Debian: apt-get install g++)" >&2
        exit 1
    fi
    echo "==> installing g++"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi

triple=$(rustc -vV | sed -n 's/^host: //p')
# Passing --target keeps these flags off build scripts and proc macros.
flags=(
    -Cpasses=sancov-module
    -Cllvm-args=-sanitizer-coverage-level=4
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
    -Cllvm-args=-sanitizer-coverage-pc-table
    -Cllvm-args=-sanitizer-coverage-trace-compares
)
features=()
[[ -z ${VMDK_FUZZ_FEATURES:-} ]] || features=(--features "$VMDK_FUZZ_FEATURES")
echo "==> building fuzz targets (${targets[*]})"
start=$SECONDS
RUSTFLAGS="${flags[*]}" cargo build --quiet --release --manifest-path fuzz/Cargo.toml \
    --target "$triple" "${features[@]}" "${targets[@]/#/--bin=}"
echo "    built in $((SECONDS - start)) s"
# tests/run.sh builds them in the background while its tests run.
[[ -z ${VMDK_FUZZ_BUILD_ONLY:-} ]] || exit 0
echo "    running each target ${per} s, ${jobs} at a time"
start=$SECONDS

out=fuzz/target
# One target's run; its report goes to $out/logs/<target>.report and its
# exit status says whether it failed.
fuzz_one() {
    local t=$1
    local work=$out/corpus/$t
    local artifacts=$out/artifacts/$t
    local log=$out/logs/$t.log
    rm -rf "$artifacts"
    mkdir -p "$work" "$artifacts" "$(dirname "$log")"
    local bin=$out/$triple/release/$t
    # Keep the local corpus small enough to load in a second: past 4000
    # files, merge it down to the inputs that add coverage (a few seconds).
    if (($(find "$work" -type f | wc -l) > 4000)); then
        rm -rf "$work.merged" && mkdir -p "$work.merged"
        if "$bin" -merge=1 -max_len=8192 "$work.merged" "$work" >"$log" 2>&1; then
            rm -rf "$work" && mv "$work.merged" "$work"
        else
            rm -rf "$work.merged"
        fi
    fi
    # New inputs go to the first directory (the local working corpus); the
    # committed seeds in fuzz/corpus/<target>/ are only read.
    local rc=0
    "$bin" -max_total_time="$per" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" "$work" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
    local runs cov
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    if ((rc == 0)); then
        printf '    %-17s ok   %s runs, %s\n' "$t" "${runs:-?}" "${cov:-cov: ?}"
        return 0
    fi
    printf '    %-17s FAILED (exit %d); log: %s\n' "$t" "$rc" "$log"
    grep -E -m1 -A8 "panicked at|ERROR: libFuzzer|==ERROR|timeout after" "$log" | sed 's/^/      /' || tail -20 "$log"
    local f
    for f in "$artifacts"/*; do
        [[ -f $f ]] || continue
        echo "      input $(basename "$f") ($(stat -c %s "$f") bytes):"
        echo "        base64: $(base64 -w0 "$f")"
        echo "        hex:    $(od -An -v -tx1 "$f" | tr -d ' \n' | head -c 4096)"
        echo "        rerun:  $out/$triple/release/$t $f"
    done
    return 1
}

# Targets run $jobs at a time (libFuzzer runs one target on one CPU); each
# writes its report to a file, shown in target order once all are done.
mkdir -p "$out/logs"
declare -A pids=()
for t in "${targets[@]}"; do
    while (($(jobs -rp | wc -l) >= jobs)); do
        wait -n || true
    done
    fuzz_one "$t" >"$out/logs/$t.report" 2>&1 &
    pids[$t]=$!
done
failed=()
for t in "${targets[@]}"; do
    wait "${pids[$t]}" || failed+=("$t")
    cat "$out/logs/$t.report"
done

if ((${#failed[@]})); then
    echo "fuzzing found failures in: ${failed[*]}" >&2
    exit 1
fi
echo "    no crash, no hang (ran $((SECONDS - start)) s)"
