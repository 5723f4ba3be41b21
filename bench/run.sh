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

# FRU training (issue 4): one epoch over the first 128 imagenet-sample images, batch 16.
TRAIN="$SHARED/data/imagenet-sample"
"$SFR" attack random -q --data "$TRAIN" --limit 8 --holdout 4 --out "$TMP/v.safetensors" >/dev/null
cat > "$TMP/defend.sh" <<EOS
"$SFR" defend -q --model mobilenet_v2 --weights "$MNV2" --data "$TRAIN" --limit 128 --val 0 \\
  --epochs 1 --no-synthetic --no-augment --uap "$TMP/v.safetensors" --out "$TMP/d.safetensors" --json |
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"images_per_second": d["training"]["train_images"] / d["training"]["seconds"]}))'
EOS
run "sfr FRU training mobilenet_v2" bash "$TMP/defend.sh"; a=$(cat "$TMP/last")
run "pytorch FRU training mobilenet_v2" /usr/bin/python3 tools/torch_bench.py defend --model mobilenet_v2 --weights "$MNV2" --data "$TRAIN" --limit 128 --batch-size 16; b=$(cat "$TMP/last")
ratio "$a" "$b"

# SGD-UAP to 80 % held-out fooling (issue 3): 1000 imagenet-sample images, 100 held out, ℓ∞ 10,
# batch 32; the held-out fooling rate is measured after each epoch in both.
"$SFR" attack sgd -q --model mobilenet_v2 --weights "$MNV2" --data "$TRAIN" --holdout 100 \
  --target-fooling-rate 0.8 --epochs 20 --out "$TMP/sgd.safetensors" --json > "$TMP/sgd.json"
python3 - "$TMP/sgd.json" <<'EOP'
import json, sys
d = json.load(open(sys.argv[1]))
print("%-34s %8.0f s to held-out fooling %.3f (%s epochs)" % ("sfr attack sgd to 80 %", d["seconds"], d["fooling_rate"], d["params"]["epochs_run"]))
EOP
/usr/bin/python3 tools/torch_bench.py sgd --model mobilenet_v2 --weights "$MNV2" --data "$TRAIN" --limit 1000 --holdout 100 --target 0.8 > "$TMP/tsgd.json"
python3 - "$TMP/tsgd.json" <<'EOP'
import json, sys
d = json.load(open(sys.argv[1]))
print("%-34s %8.0f s to held-out fooling %.3f (%d epochs)" % ("pytorch SGD-UAP to 80 %", d["seconds"], d["holdout_fooling_rate"][-1], d["epochs"]))
EOP
