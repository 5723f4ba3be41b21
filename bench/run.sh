#!/usr/bin/env bash
# Throughput and peak memory of sfr against PyTorch (Debian's CPU build) on the same workloads,
# on this machine, in one run. Usage: bench/run.sh [N_IMAGES]   (default 256)
# Needs ../shared (or SFR_SHARED), /usr/bin/python3 with torch + torchvision, and pip for fetch.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-256}
SHARED=${SFR_SHARED:-../shared}
DATA="$SHARED/data/nips17"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cargo build --release --quiet --bin sfr --example grad_bench
BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
SFR="$BIN/sfr"
MNV2=$("$SFR" fetch mobilenet_v2 --json -q | python3 -c 'import json,sys; print(json.load(sys.stdin)["fetched"][0]["path"])')
/usr/bin/python3 tools/zoo_reference.py --out "$TMP" --arch resnet50 --no-f64 --cache "$TMP/cache" >/dev/null

# run LABEL CMD...: time a command, print its JSON images/s and peak RSS.
run() {
  local label=$1; shift
  local out
  out=$(/usr/bin/time -f '%M' -o "$TMP/rss" "$@")
  local ips
  ips=$(printf '%s' "$out" | tail -n 1 | python3 -c 'import json,sys; print("%.1f" % json.load(sys.stdin)["images_per_second"])')
  printf '%-34s %8s images/s  peak RSS %6d MiB\n' "$label" "$ips" $(( $(cat "$TMP/rss") / 1024 ))
  echo "$ips" > "$TMP/last"
}
ratio() { python3 -c "print('  ratio sfr/pytorch: %.2f' % ($1 / $2))"; }

echo "machine: $(nproc) cores; $N nips17 images; batch 32"
run "sfr eval mobilenet_v2" "$SFR" eval -q --model mobilenet_v2 --weights "$MNV2" --data "$DATA" --limit "$N" --json; a=$(cat "$TMP/last")
run "pytorch eval mobilenet_v2" /usr/bin/python3 tools/torch_bench.py eval --model mobilenet_v2 --weights "$MNV2" --data "$DATA" --limit "$N"; b=$(cat "$TMP/last")
ratio "$a" "$b"
run "sfr eval resnet50" "$SFR" eval -q --model resnet50 --weights "$TMP/resnet50.safetensors" --data "$DATA" --limit "$N" --json; a=$(cat "$TMP/last")
run "pytorch eval resnet50" /usr/bin/python3 tools/torch_bench.py eval --model resnet50 --data "$DATA" --limit "$N"; b=$(cat "$TMP/last")
ratio "$a" "$b"
run "sfr input-gradient mobilenet_v2" "$BIN/examples/grad_bench" mobilenet_v2 "$MNV2" 32 5; a=$(cat "$TMP/last")
run "pytorch input-gradient mobilenet_v2" /usr/bin/python3 tools/torch_bench.py grad --model mobilenet_v2 --weights "$MNV2"; b=$(cat "$TMP/last")
ratio "$a" "$b"
