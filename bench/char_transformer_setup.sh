# bench/char_transformer_setup.sh: what bench/run_char_transformer.sh, run_compressors.sh and
# run_whole_model.sh share. Sourced, not run, from the repository root; the caller sets `steps` (its
# default) and `flags` (char_transformer's arguments), and calls
#   ct_setup SCRIPT HELP_LINES "$@"   parses [--steps S] [--threads T] [--out DIR] [--build DIR] into steps,
#                                     threads, out_dir, build (default build/char-transformer); --help prints
#                                     lines 2..HELP_LINES of bench/SCRIPT; installs fortunes and gnuplot-nox;
#                                     builds examples/char_transformer in Release with -march=native
#   ct_train ARGS...                  runs char_transformer "${flags[@]}" ARGS, teed into $run_dir/log.txt
#   ct_machine_lines WHAT             the results' command, machine, build and date lines

ct_setup() {
  local name="$1" help_last="$2"
  shift 2
  command_line="bash bench/$name${*:+ $*}"
  threads=2
  out_dir=bench/results
  build=build/char-transformer
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --steps) steps="$2"; shift 2 ;;
      --threads) threads="$2"; shift 2 ;;
      --out) out_dir="$2"; shift 2 ;;
      --build) build="$2"; shift 2 ;;
      -h|--help) sed -n "2,${help_last}p" "bench/$name"; exit 0 ;;
      *) echo "$name: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
  done
  bash .ci/deps fortunes gnuplot-nox
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=-march=native -DCOMPACT_BUILD_CUDA=OFF \
    -DCOMPACT_BUILD_TESTS=OFF -DCOMPACT_BUILD_BENCH=OFF -DCOMPACT_USE_MPI=OFF -DCOMPACT_USE_TORCH=OFF >/dev/null
  cmake --build "$build" --target char_transformer -j2
  mkdir -p "$out_dir"
  # libgomp spins waiting threads by default, which starves other jobs on a shared machine.
  export OMP_WAIT_POLICY=passive
}

# The command, machine, build and date lines of a results file, after ct_train; $1 names what its
# seconds cover.
ct_machine_lines() {
  local cpu_model flags_used compiler
  cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
  flags_used=$(sed -n 's/^CXX_FLAGS = //p' "$build/examples/CMakeFiles/char_transformer.dir/flags.make")
  compiler=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")
  echo "- command: \`$command_line\`, which runs \`char_transformer ${flags[*]}\`"
  echo "- machine: $cpu_model, $(nproc) logical CPUs; $threads OpenMP threads; load average $load_before before,"
  echo "  $load_after after; $((finished - started)) s for $1, evaluations and sampling included"
  echo "- build: $("$compiler" --version | head -1); flags \`$flags_used\`"
  echo "- date: $(date -u '+%F %T') UTC"
}

# Runs char_transformer with the caller's `flags` and these extra arguments, its output teed into
# $run_dir/log.txt; records the time and the load average before and after, for ct_machine_lines.
ct_train() {
  load_before=$(cut -d' ' -f1-3 /proc/loadavg)
  started=$(date +%s)
  "$build/examples/char_transformer" "${flags[@]}" "$@" | tee "$run_dir/log.txt"
  finished=$(date +%s)
  load_after=$(cut -d' ' -f1-3 /proc/loadavg)
}
