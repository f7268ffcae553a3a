#!/usr/bin/env bash
# Benchmark of data-parallel training (examples/data_parallel.cpp, SPEC section 11) on this machine:
#   * bytes all-reduced per step at r = n/4 against uncompressed data parallelism (target <= 0.26);
#   * 2 ranks x 1 thread against 1 rank x 2 threads on the same global batch (target <= 1.2 the time);
#   * the final loss and weights of 1, 2 and 4 ranks against one process on the same global batches.
# The two timed configurations are run alternately REPEATS times and the fastest of each is kept, so that
# other load on a shared machine disturbs both alike. Writes bench/results/data_parallel-cpu-<date>.md.
#   bash bench/data_parallel.sh [build-dir] [steps] [repeats]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=${1:-build/release}
steps=${2:-200}
repeats=${3:-5}
out=bench/results/data_parallel-cpu-${DATE:-$(date +%Y-%m-%d)}.md

bash .ci/deps libopenmpi-dev openmpi-bin >&2
[[ -f $build/CMakeCache.txt ]] || cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$build" --target data_parallel -j2 >&2
exe=$build/examples/data_parallel
export OMP_WAIT_POLICY=passive OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
run() { mpiexec -n "$1" --oversubscribe "$exe" --steps "$steps" --threads "$2" "${@:3}"; }
ms() { sed -n 's/^time per step: \([0-9.]*\) ms$/\1/p'; }

best1x2=1e9 best2x1=1e9 all1x2="" all2x1=""
for ((i = 0; i < repeats; ++i)); do
  t=$(run 1 2 --no-reference | ms); all1x2+=" $t"; best1x2=$(awk -v a="$best1x2" -v b="$t" 'BEGIN{print (b<a)?b:a}')
  t=$(run 2 1 --no-reference | ms); all2x1+=" $t"; best2x1=$(awk -v a="$best2x1" -v b="$t" 'BEGIN{print (b<a)?b:a}')
done
ratio=$(awk -v a="$best2x1" -v b="$best1x2" 'BEGIN{printf "%.3f", a/b}')
log1=$(run 1 1); log2=$(run 2 1); log4=$(run 4 1)
bytes=$(sed -n 's/^bytes all-reduced per step: \([0-9]*\) (uncompressed data parallelism: \([0-9]*\)), ratio \([0-9.]*\)$/\1 \2 \3/p' <<<"$log2")

{
  echo "# Data-parallel training on the CPU ($(date +%Y-%m-%d))"
  echo
  echo "examples/data_parallel.cpp: MLP 256-512-512-10, every layer at r = n/4, float, global batch 256,"
  echo "$steps steps, Open MPI $(mpiexec --version | sed -n 's/.*) \([0-9.]*\).*/\1/p' | head -1), $(nproc) cores"
  echo "($(lscpu | sed -n 's/^Model name: *//p')), g++ $(g++ -dumpversion), built Release. Command: \`bash bench/data_parallel.sh $build $steps $repeats\`."
  echo
  echo "## Bytes all-reduced per step"
  echo
  read -r sent full share <<<"$bytes"
  echo "| payload per step | bytes | share |"
  echo "|---|---|---|"
  echo "| compressed (G_sub m r + biases) | $sent | $share |"
  echo "| uncompressed data parallelism (G m n + biases) | $full | 1 |"
  echo
  echo "Target: at most 0.26. Exact: sum_l m_l r_l + biases = 512·64 + 512·128 + 10·128 + 1034 = 100618 floats."
  echo
  echo "## Time per step: 2 ranks x 1 thread against 1 rank x 2 threads, same global batch"
  echo
  echo "| configuration | fastest of $repeats (ms) | all runs (ms) |"
  echo "|---|---|---|"
  echo "| 1 rank x 2 threads | $best1x2 |$all1x2 |"
  echo "| 2 ranks x 1 thread | $best2x1 |$all2x1 |"
  echo
  echo "Ratio 2x1 / 1x2: **$ratio** (target at most 1.2)."
  echo
  echo "## R ranks against one process on the same global batches (ordered reduction)"
  echo
  echo '```'
  for l in "$log1" "$log2" "$log4"; do grep -E '^(final loss|[0-9]+ ranks x)' <<<"$l"; done
  echo '```'
} > "$out"
cat "$out"
