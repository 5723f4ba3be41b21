#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 60), one after another, niced:
#   fuzz/run.sh 1800
# Timeouts (-timeout=10 s an input) and memory blow-ups (-rss_limit_mb=2048) count as crashes.
# Crashing inputs land in fuzz/artifacts/<target>/; each found one becomes a regression test in
# tests/fuzz_regressions.rs. Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
# Prints, per target, the executions done and whether it crashed; exits 1 if any did.
set -uo pipefail
secs=${1:-60}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
"$here/seed.sh"
targets=${FUZZ_TARGETS:-"pth safetensors npy mat h5 perturbation defence labels_csv image_folder"}
flags=(-s none -a)   # Rust needs no ASan; debug assertions catch overflows
nice -n 15 cargo +nightly fuzz build "${flags[@]}" || exit 1
status=0
summary=""
for t in $targets; do
    mkdir -p "logs"
    log="logs/$t.log"
    nice -n 15 cargo +nightly fuzz run "${flags[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=1048576 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ $rc -ne 0 ]; then
        status=1
        summary+="$t: CRASH (rc $rc) after ${execs:-?} executions; see fuzz/$log and fuzz/artifacts/$t/"$'\n'
    else
        summary+="$t: ${execs:-?} executions in ${secs} s, no crash"$'\n'
    fi
done
printf '%s' "$summary"
exit $status
