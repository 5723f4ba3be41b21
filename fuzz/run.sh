#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 60), one after another, niced:
#   fuzz/run.sh 1800
# Timeouts (-timeout=10 s an input) and memory blow-ups (-rss_limit_mb=2048) count as crashes.
# Inputs are cut to FUZZ_MAX_LEN bytes (default 64 KiB): the published files are ~600 KB, and
# inputs that big run at a few executions a second (small ones at thousands).
# Crashing inputs land in fuzz/artifacts/<target>/; each one found becomes a regression test in
# tests/robustness.rs (beside the bomb tests). Needs the nightly toolchain and cargo-fuzz
# (cargo install cargo-fuzz).
# Prints, per target, the executions done and whether it crashed; exits 1 if any did.
set -uo pipefail
secs=${1:-60}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
"$here/seed.sh"
targets=${FUZZ_TARGETS:-"pth safetensors npy mat h5 perturbation defence labels_csv image_folder"}
flags=(-s none -a)   # Rust needs no ASan; debug assertions catch overflows
nice -n 15 cargo +nightly fuzz build "${flags[@]}" || exit 1
# The built fuzzers, run directly: `cargo fuzz run` would take cargo's locks again for each.
bin=target/x86_64-unknown-linux-gnu/release
status=0
summary=""
mkdir -p logs
for t in $targets; do
    log="logs/$t.log"
    mkdir -p "artifacts/$t"
    nice -n 15 "$bin/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len="${FUZZ_MAX_LEN:-65536}" \
        -print_final_stats=1 "corpus/$t" >"$log" 2>&1
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
