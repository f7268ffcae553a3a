#!/usr/bin/env bash
# bench/run_cuda.sh: builds bench/cuda_step for the GPU, runs it and writes its results file.
#
#   bash bench/run_cuda.sh [--tests] [--sanitize] [--direct] [--build DIR] [--out DIR] [-- cuda_step arguments]
#
# Builds the target bench_cuda_step in Release with the CUDA build on, for compute capabilities 8.0 and
# 9.0 (CMAKE_CUDA_ARCHITECTURES "80;90"), into build/cuda-bench (or --build DIR), runs it on this
# machine's GPU and writes
#   <out>/cuda-<device name>-<date>.md    the machine (nvidia-smi's clocks and power limit before and
#                                         after), the build, and the benchmark's report
# (<out> is bench/results unless --out DIR, which also receives cuda-<device>-<date>-logs.tar.gz, every
# log of the run). Arguments after `--` go to cuda_step (for example
# `-- --shapes 32768x4096 --runs 50`). Without a CUDA device the program exits 77 and so does this
# script, writing nothing.
#
# --tests also builds every CUDA test, tests/cuda/*.cu (the CMake targets of the same names, with
# COMPACT_DEBUG_SYNC as CTest builds them), runs each and appends a table of their doctest summaries.
# --sanitize does what --tests does, then runs every test and `cuda_step --smoke` again under
# `compute-sanitizer --tool memcheck`, appending each one's exit status and error summary.
#
# Exit status: cuda_step's (0, 1 for a failed check, 3 for a missed target with --check-target, 77 when
# skipped); 4 when cuda_step passed but a test failed or the sanitizer reported errors; 2 for a bad
# command line.
#
# The top-level CMake project needs Eigen 3.4 (and the tests doctest) even for CUDA-only targets. Where
# configuring fails for that reason, or with --direct, the script compiles with nvcc directly, with the
# flags the CMake build uses (warnings as errors); the tests then need doctest/doctest.h on the include
# path (DOCTEST_INCLUDE_DIR) and are skipped, saying so, without it. A test that fails to build is
# reported and the others still run; only the benchmark's own build failing ends the run early.
#
# Environment: JOBS (parallel builds; nproc), NVCC_WERROR=0 (warnings not errors, for a host compiler
# newer than CI's), COMPACT_TEST_TIMEOUT (seconds for each test run and each memcheck run; 300).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command_line="bash bench/run_cuda.sh${*:+ $*}"
build=build/cuda-bench
out_dir=bench/results
out_given=0
tests=0
sanitize=0
direct=0
bench_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tests) tests=1; shift ;;
    --sanitize) tests=1; sanitize=1; shift ;;
    --direct) direct=1; shift ;;
    --build) build="$2"; shift 2 ;;
    --out) out_dir="$2"; out_given=1; shift 2 ;;
    --) shift; bench_args=("$@"); break ;;
    -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "run_cuda.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

nvcc=$(command -v nvcc || true)
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$nvcc" ]]; then
  echo "run_cuda.sh: nvcc not found (put the CUDA toolkit's bin on PATH)" >&2
  exit 2
fi
cuda_bin=$(dirname "$nvcc")
jobs=${JOBS:-$(nproc)}
mkdir -p "$build"

# ------------------------------------------------------------------------------------------ build
# The flags of bench/CMakeLists.txt and tests/CMakeLists.txt, for the nvcc-only build.
nvcc_flags=(-std=c++17 -O3 -DNDEBUG -Iinclude
            -gencode "arch=compute_80,code=sm_80" -gencode "arch=compute_90,code=sm_90"
            "-Xcompiler=-Wall,-Wextra,-Wshadow,-Wconversion,-Wno-sign-conversion")
# Warnings are errors, as in CI, unless NVCC_WERROR=0: a newer host compiler than CI's may warn where
# CI's does not, and a one-off GPU run should still get its binaries.
if [[ ${NVCC_WERROR:-1} != 0 ]]; then nvcc_flags+=(-Xcompiler=-Werror --Werror=all-warnings); fi
bench_bin="$build/bench/cuda_step"
test_bins=()
tests_failed_to_build=()
build_how=""
tests_note=""

# Every CUDA test: tests/cuda/test_cuda_backend.cu -> test_cuda_backend, ...
test_names=()
for source in tests/cuda/*.cu; do test_names+=("$(basename "$source" .cu)"); done

build_direct() {
  mkdir -p "$build/bench" "$build/tests"
  echo "run_cuda.sh: compiling bench/cuda_step.cu with $nvcc"
  "$nvcc" "${nvcc_flags[@]}" bench/cuda_step.cu -lcublas -o "$bench_bin" &
  local pids=($!)
  build_how="nvcc directly: \`nvcc ${nvcc_flags[*]} bench/cuda_step.cu -lcublas\`"
  if [[ $tests == 1 ]]; then
    # The compiler's default include directories must not be named again (-isystem /usr/include breaks
    # libstdc++'s #include_next), so only DOCTEST_INCLUDE_DIR is added.
    local doctest_flags=()
    if [[ -n "${DOCTEST_INCLUDE_DIR:-}" ]]; then
      doctest_flags=(-isystem "$DOCTEST_INCLUDE_DIR")
    elif [[ ! -f /usr/include/doctest/doctest.h && ! -f /usr/local/include/doctest/doctest.h ]]; then
      tests_note="tests not built: doctest/doctest.h not found (set DOCTEST_INCLUDE_DIR)"
    fi
    if [[ -z "$tests_note" ]]; then
      # One nvcc per test, all at once: each is one translation unit, so this is the build's parallelism.
      for t in "${test_names[@]}"; do
        echo "run_cuda.sh: compiling tests/cuda/$t.cu"
        "$nvcc" "${nvcc_flags[@]}" -DCOMPACT_DEBUG_SYNC ${doctest_flags[@]+"${doctest_flags[@]}"} "tests/cuda/$t.cu" \
          tests/doctest_main.cpp -lcublas -o "$build/tests/$t" >"$build/tests/$t.build.log" 2>&1 &
        pids+=($!)
      done
    fi
  fi
  # The benchmark's build failing ends the run; a test's is reported and the others still run.
  if ! wait "${pids[0]}"; then
    echo "run_cuda.sh: bench/cuda_step.cu failed to compile" >&2
    exit 1
  fi
  local k=1
  if [[ $tests == 1 && -z "$tests_note" ]]; then
    for t in "${test_names[@]}"; do
      if wait "${pids[$k]}"; then
        test_bins+=("$build/tests/$t")
      else
        echo "run_cuda.sh: tests/cuda/$t.cu failed to compile:" >&2
        tail -n 20 "$build/tests/$t.build.log" >&2 || true
        tests_failed_to_build+=("$t")
      fi
      k=$((k + 1))
    done
  fi
}

build_cmake() {
  local build_tests=OFF
  if [[ $tests == 1 ]]; then build_tests=ON; fi
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCOMPACT_BUILD_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DCMAKE_CUDA_ARCHITECTURES="80;90" -DCOMPACT_BUILD_TESTS=$build_tests -DCOMPACT_BUILD_EXAMPLES=OFF \
    -DCOMPACT_BUILD_BENCH=ON >"$build/configure.log" 2>&1 || return 1
  cmake --build "$build" --target bench_cuda_step -j "$jobs" || return 1
  build_how="CMake, Release, CMAKE_CUDA_ARCHITECTURES 80;90, target bench_cuda_step"
  if [[ $tests == 1 ]]; then
    # A stale binary must not pass for a fresh one; -k (make's keep-going): one test failing to build
    # leaves the others built.
    for t in "${test_names[@]}"; do rm -f "$build/tests/$t"; done
    cmake --build "$build" --target "${test_names[@]}" -j "$jobs" -- -k || true
    for t in "${test_names[@]}"; do
      if [[ -x "$build/tests/$t" ]]; then test_bins+=("$build/tests/$t"); else tests_failed_to_build+=("$t"); fi
    done
  fi
}

if [[ $direct == 1 ]]; then
  build_direct
elif ! build_cmake; then
  echo "run_cuda.sh: CMake could not configure (see $build/configure.log; Eigen 3.4 or doctest missing?):"
  tail -n 5 "$build/configure.log" | sed 's/^/  /'
  # A build tree CMake left half-configured would make the next CMake attempt fail the same way.
  rm -f "$build/CMakeCache.txt"
  build_direct
  build_how="$build_how (CMake could not configure: $(grep -m1 -i 'error' "$build/configure.log" || echo 'see configure.log'))"
fi

# -------------------------------------------------------------------------------------------- run
run_dir="$build/cuda-step-run"
mkdir -p "$run_dir"
gpu_query=name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu
smi() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu="$gpu_query" --format=csv,noheader 2>/dev/null | head -n 1 || echo "nvidia-smi failed"
  else
    echo "nvidia-smi not found"
  fi
}
smi_before=$(smi)
started=$(date +%s)
rm -f "$run_dir/report.md"
set +e
"$bench_bin" ${bench_args[@]+"${bench_args[@]}"} --markdown "$run_dir/report.md" 2>&1 | tee "$run_dir/log.txt"
status=${PIPESTATUS[0]}
set -e
finished=$(date +%s)
smi_after=$(smi)
if [[ $status == 77 ]]; then
  echo "run_cuda.sh: no usable CUDA device: skipped, nothing written"
  exit 77
fi
if [[ ! -f "$run_dir/report.md" ]]; then
  # A crash or an exception: keep going, so that the tests and the sanitizer still say what went wrong.
  echo "run_cuda.sh: cuda_step exited $status without a report" >&2
  {
    echo "cuda_step exited with status $status without writing its report; the end of its output:"
    echo
    echo '```'
    tail -n 60 "$run_dir/log.txt" || true
    echo '```'
  } >"$run_dir/report.md"
  if [[ $status == 0 ]]; then status=1; fi
fi

# "NVIDIA H100 80GB HBM3" -> nvidia-h100-80gb-hbm3; from nvidia-smi, else from the report's device line.
device_name=""
if command -v nvidia-smi >/dev/null 2>&1; then
  device_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
fi
if [[ -z "$device_name" ]]; then
  device_name=$(sed -n 's/^- device: \(.*\) (compute capability.*/\1/p' "$run_dir/report.md" | head -n 1)
fi
slug=$(printf '%s' "${device_name:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
date_tag=$(date +%Y-%m-%d)
mkdir -p "$out_dir"
md="$out_dir/cuda-$slug-$date_tag.md"

{
  echo "# CUDA benchmark: ${device_name:-unknown GPU}, $date_tag"
  echo
  echo "Written by \`$command_line\`; see bench/README.md (\"cuda_step\") for how to read the tables."
  echo
  echo "- machine: $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $(nproc) logical CPUs"
  echo "- nvidia-smi ($gpu_query) before: $smi_before; after: $smi_after"
  echo "- build: $build_how; $("$nvcc" --version | tail -n 1)"
  echo "- run time: $((finished - started)) s; exit status $status"
  echo
  cat "$run_dir/report.md"
} >"$md"

# ---------------------------------------------------------------------------------------- tests
tests_failed=0
if [[ ${#tests_failed_to_build[@]} -gt 0 ]]; then tests_failed=1; fi
# Each test, and each run under the sanitizer, is stopped after this many seconds (exit status 124).
test_timeout=${COMPACT_TEST_TIMEOUT:-300}
if [[ $tests == 1 ]]; then
  {
    echo
    echo "### CUDA tests (tests/cuda/*.cu, built with COMPACT_DEBUG_SYNC)"
    echo
    if [[ -n "$tests_note" ]]; then echo "$tests_note."; fi
    if [[ ${#tests_failed_to_build[@]} -gt 0 ]]; then echo "Failed to build: ${tests_failed_to_build[*]}."; fi
    echo
    echo "| test | exit status | seconds | doctest summary |"
    echo "|---|---|---|---|"
  } >>"$md"
  failures=""
  for bin in ${test_bins[@]+"${test_bins[@]}"}; do
    name=$(basename "$bin")
    log="$run_dir/$name.log"
    echo "run_cuda.sh: $name"
    t0=$(date +%s)
    set +e
    timeout "$test_timeout" "$bin" >"$log" 2>&1
    code=$?
    set -e
    t1=$(date +%s)
    # doctest's "test cases: 3 | 3 passed | ..." lines, with | (a table separator here) as commas.
    summary=$(grep -E '^\[doctest\] (test cases|assertions):' "$log" | sed 's/^\[doctest\] *//; s/  */ /g; s/ |$//; s/ | /, /g' |
      paste -sd ';' - || true)
    echo "| $name | $code | $((t1 - t0)) | ${summary:-none printed} |" >>"$md"
    # 77: every case skipped, which on a GPU machine means the device was not usable: a failure here.
    if [[ $code != 0 ]]; then
      tests_failed=1
      failures+=$'\n'"#### $name (exit status $code)"$'\n\n```\n'
      failures+="$(grep -vE '^\[doctest\] (doctest version|run with)' "$log" | tail -n 60 || true)"
      failures+=$'\n```\n'
    fi
  done
  if [[ -n "$failures" ]]; then echo "$failures" >>"$md"; fi
fi

# ----------------------------------------------------------------------------------- sanitizer
if [[ $sanitize == 1 ]]; then
  sanitizer=$(command -v compute-sanitizer || true)
  if [[ -z "$sanitizer" && -x "$cuda_bin/compute-sanitizer" ]]; then sanitizer="$cuda_bin/compute-sanitizer"; fi
  {
    echo
    echo "### compute-sanitizer --tool memcheck"
    echo
  } >>"$md"
  if [[ -z "$sanitizer" ]]; then
    echo "compute-sanitizer not found: not run." >>"$md"
  else
    {
      echo "$("$sanitizer" --version | tail -n 1)."
      if [[ -n "$tests_note" ]]; then echo "$tests_note."; fi
      echo
      echo "| program | exit status | error summary |"
      echo "|---|---|---|"
    } >>"$md"
    details=""
    sanitizer_failed=0
    # memcheck NAME PROGRAM [ARGUMENTS]: one row of the table; the first lines of its report when it
    # found errors.
    memcheck() {
      local name=$1 log="$run_dir/memcheck-${1// /_}.log" code summary
      shift
      echo "run_cuda.sh: compute-sanitizer --tool memcheck $name"
      set +e
      timeout "$test_timeout" "$sanitizer" --tool memcheck --leak-check full --print-limit 20 "$@" >"$log" 2>&1
      code=$?
      set -e
      summary=$(grep -m1 'ERROR SUMMARY' "$log" | sed 's/^=* *//' || true)
      echo "| $name | $code | ${summary:-none printed} |" >>"$md"
      if [[ $code != 0 && $code != 77 ]]; then sanitizer_failed=1; fi
      if ! grep -q 'ERROR SUMMARY: 0 errors' "$log"; then
        sanitizer_failed=1
        details+=$'\n'"#### $name"$'\n\n```\n'"$(grep '^=========' "$log" | head -n 40 || true)"$'\n```\n'
      fi
    }
    memcheck "cuda_step --smoke" "$bench_bin" --smoke
    for bin in ${test_bins[@]+"${test_bins[@]}"}; do memcheck "$(basename "$bin")" "$bin"; done
    {
      if [[ -n "$details" ]]; then echo "$details"; fi
      echo
      echo "Exit status 77: the binary skipped every device case (no usable GPU)."
    } >>"$md"
  fi
fi

# Every log of this run (the benchmark's, each test's and each memcheck's, the build logs) in one file:
# beside the results file when --out names a folder, else in the build folder.
for f in "$build"/tests/*.build.log "$build/configure.log"; do
  if [[ -f "$f" ]]; then cp "$f" "$run_dir/"; fi
done
logs="$build/cuda-$slug-$date_tag-logs.tar.gz"
if [[ $out_given == 1 ]]; then logs="$out_dir/cuda-$slug-$date_tag-logs.tar.gz"; fi
tar -czf "$logs" -C "$run_dir" . || true
echo "run_cuda.sh: wrote $md and $logs"
if [[ $status == 0 && ($tests_failed == 1 || ${sanitizer_failed:-0} == 1) ]]; then
  echo "run_cuda.sh: a CUDA test failed or compute-sanitizer reported errors (see $md)" >&2
  exit 4
fi
exit "$status"
