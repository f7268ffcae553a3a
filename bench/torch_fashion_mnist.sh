#!/usr/bin/env bash
# Benchmarks compact::torch against torch::nn::Linear on Fashion-MNIST (examples/torch/torch_fashion_mnist)
# and writes bench/results/torch-cpu-<date>.md. torch must run on OpenBLAS (Debian's libopenblas0-openmp):
# Debian's default reference BLAS makes torch ten times slower and the step-time ratio meaningless. Both
# models run on the same threads (torch's intra-op count, which compact uses too), one after the other.
#
#   bash bench/torch_fashion_mnist.sh [--batches "256 1024"] [--seeds "1 2 3"] [--epochs E] [--threads T]
#                                     [other torch_fashion_mnist options]
#
# Runs the example once per batch size and seed (default batches 256 and 1024: the step-time ratio
# depends on the batch, since the optimizer's m r n projection back does not shrink with it; default
# seeds 1 2 3 and 10 epochs: one run's accuracy on 10,000 test images moves by about 0.3 points, the gap
# between two models by more) and reports, per batch size, the mean and the spread of the accuracy gap
# and of the step-time ratio. With the defaults it takes about 15 minutes on an idle 2-core machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command_line="bash bench/torch_fashion_mnist.sh${*:+ $*}"
batches="256 1024"
seeds="1 2 3"
args=(--epochs 10)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --batches) batches="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
bash .ci/deps libtorch-dev libopenblas0-openmp dataset-fashion-mnist
build=build/bench-torch
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCOMPACT_BUILD_TESTS=OFF -DCOMPACT_BUILD_BENCH=OFF \
  -DCOMPACT_BUILD_CUDA=OFF >/dev/null
cmake --build "$build" --target torch_fashion_mnist -j2
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || echo unknown)
out="bench/results/torch-cpu-$(date +%Y-%m-%d).md"
log=""
summary=""
started=$(date +%s)
for batch in $batches; do
  runs=""
  for seed in $seeds; do
    run=$(OMP_WAIT_POLICY=passive "$build/examples/torch/torch_fashion_mnist" --batch "$batch" --seed "$seed" "${args[@]}")
    echo "$run"
    log+="$run"$'\n\n'
    runs+="$run"$'\n'
  done
  # Per seed: the two table rows (accuracy, step time, bytes) and the ratios line.
  summary+=$(awk -v batch="$batch" '
    /^\| nn::Linear/ { split($0, f, "|"); ref_acc = f[3] + 0 }
    /^\| compact/    { split($0, f, "|"); acc = f[3] + 0 }
    /^ratios/ { n++; gsub(/[;,]/, ""); saved[n] = $7; step[n] = $10; gap[n] = acc - ref_acc; ref[n] = ref_acc; cmp[n] = acc }
    function mean(a,   i, s) { s = 0; for (i = 1; i <= n; i++) s += a[i]; return s / n }
    function sd(a,   i, m, s) { if (n < 2) return 0; m = mean(a); s = 0; for (i = 1; i <= n; i++) s += (a[i] - m)^2; return sqrt(s / (n - 1)) }
    function lo(a,   i, v) { v = a[1]; for (i = 2; i <= n; i++) if (a[i] < v) v = a[i]; return v }
    function hi(a,   i, v) { v = a[1]; for (i = 2; i <= n; i++) if (a[i] > v) v = a[i]; return v }
    END {
      printf "| %d | %d | %.2f%% | %.2f%% | %+.2f (sd %.2f; %+.2f to %+.2f) | %.3f (%.3f to %.3f) | %.3f |\n", batch, n,
        mean(ref), mean(cmp), mean(gap), sd(gap), lo(gap), hi(gap), mean(step), lo(step), hi(step), mean(saved)
    }' <<<"$runs")$'\n'
done
finished=$(date +%s)
{
  echo "# compact::torch against torch::nn::Linear: Fashion-MNIST MLP (784-1024-1024-10)"
  echo
  echo "\`$command_line\` on $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -1)),"
  echo "libtorch $(dpkg-query -W -f='${Version}' libtorch-dev 2>/dev/null), BLAS $blas; $((finished - started)) s in all."
  echo "nn::Linear + torch::relu + torch::optim::AdamW (lr 1e-3) against compact::torch::Linear at r = n/4 for"
  echo "the two hidden layers (a new P every 50 updates, kept for its epoch; the compressor's products on"
  echo "torch's BLAS), the output layer's input kept at 8 bits, compact::torch::ReLU (1-bit masks) and"
  echo "SubspaceAdamW (projected weights lr 1e-2, alpha 0.25, moments reset when P changes; the rest lr 1e-3),"
  echo "the same initial weights and batches for both (one pair of runs per seed). Settings chosen on a"
  echo "validation split: torch-tuning-2026-12-05.md. Saved bytes: the autograd graph walked at the first step"
  echo "(compact::torch::saved_for_backward), parameters excluded."
  echo
  echo "| batch | seeds | nn::Linear test accuracy (mean) | compact (mean) | accuracy gap, points | step time ratio | saved bytes ratio |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s' "$summary"
  echo
  echo "Each run:"
  echo
  echo '```'
  printf '%s' "$log"
  echo '```'
} > "$out"
echo "wrote $out"
