#!/usr/bin/env bash
# bench/run_char_transformer.sh: regenerates bench/results/char_transformer.md and .png.
#
#   bash bench/run_char_transformer.sh [--steps S] [--threads T] [--out DIR] [--build DIR]
#
# Installs what it needs (Debian's fortunes package for the text, gnuplot-nox for the plot), builds
# examples/char_transformer in Release with -march=native into build/char-transformer (or --build DIR),
# trains the uncompressed model and the r = n/4 one for the same steps on the same batches, each in its own
# process, and writes
#   <out>/char_transformer.md    machine, configuration, losses, memory, throughput, samples, the target
#   <out>/char_transformer.png   loss curves and the relative validation-loss gap against the step
# (<out> is bench/results unless --out DIR). With the committed settings (2000 steps, 2 threads) it takes
# about 11 minutes on an idle 2-core machine. Every figure in the results is measured by the run that
# writes them; the tuning history at the end is fixed text.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source bench/char_transformer_setup.sh
steps=2000
ct_setup run_char_transformer.sh 14 "$@"

# The committed configuration: the program's defaults for the model, with these training settings.
flags=(--steps "$steps" --threads "$threads" --rank n/4 --lr 3e-3 --alpha 1 --gap 50 --moments keep
       --warmup 100 --eval-every 100 --sample 600)

run_dir="$build/char-transformer-run"
mkdir -p "$run_dir"
md="$out_dir/char_transformer.md"
png="$out_dir/char_transformer.png"

ct_train --markdown "$run_dir/report.md" --curves "$run_dir/curve"

gnuplot -e "full='$run_dir/curve.full.csv'; compressed='$run_dir/curve.n4.csv'; out='$png'; \
            label='r = n/4'" bench/plot_char_transformer.gp

{
  echo "# Character-level transformer, uncompressed and compressed, $(date -u +%F)"
  echo
  echo "examples/char_transformer.cpp trains a small decoder-only transformer (token and learned position"
  echo "embeddings, RMSNorm, causal multi-head attention, SwiGLU MLP, tied output head; forward and backward"
  echo "written by hand) on characters, twice from the same initial weights on the same batches: uncompressed"
  echo "(rank::full: P = I through the same code) and with the linear layers' activations compressed to r = n/4"
  echo "(q, k, v one input group, gate and up another, down alone; the attention output projection"
  echo "uncompressed, as in the paper)."
  echo
  ct_machine_lines "both runs"
  echo
  cat "$run_dir/report.md"
  echo
  echo "### Loss curves"
  echo
  echo "![loss curves](char_transformer.png)"
  echo
  echo "Left: validation loss (solid, on 256 windows spread over the validation split) and training loss (dashed,"
  echo "the mean batch loss over the previous 100 steps). Right: the compressed run's validation loss relative to"
  echo "the uncompressed run's at the same step."
  echo
  cat <<'EOF'
### The target, and what was tried

The target is a validation loss at r = n/4 within 3% of the uncompressed run's at equal steps. It is
**missed**: the compressed run ends 6.2% above the uncompressed one (the line under the results table).
The gap is not a slow start that closes later: it opens while both runs leave the early loss plateau
(steps 200-500), then stays at 0.10-0.12 nats from step 800 to the end (right panel); the compressed run
at step 2000 has the loss the uncompressed run had near step 1150. At this scale (n = 128 for q/k/v and
gate/up, so r = 32) updating each weight only in a random quarter of its input space, T steps at a time,
costs about 40% of every step's progress. At r = n/2 (alpha 2, T 200) the gap after 2000 steps is 3.5%,
just outside the target. What n/4 buys is in the memory table: the compressed layers' saved inputs and
optimizer state shrink 4x.

Every run below used the same seed, so the same initial weights, batches and projections, and the
uncompressed runs' learning rate (3e-3) for everything that is not compressed. Losses are the validation
loss on the 256 periodic windows at the last step, except the 2000-step rows, which are on the whole
validation split. alpha is hyper.alpha (W -= lr alpha N P^T; without weight decay, alpha and the
compressed groups' learning rate are one knob), T the resampling gap options.resample.gap, and
keep/reset/transfer the subspace-AdamW moment policy at a new P.

| steps | run | val loss | against the uncompressed run at the same step |
|---|---|---|---|
| 600 | uncompressed, lr 2e-3 / 3e-3 / 6e-3 | 2.015 / **1.870** / 1.891 | |
| 600 | r = n/4, T 50, keep: alpha 0.5 / 1 / 2 / 4 | 2.140 / 2.061 / 2.094 / 2.013 | +14.4% / +10.2% / +11.9% / +7.6% |
| 600 | r = n/4, T 50, keep, alpha 8 | 2.556 | +36.7%: never left the plateau near 2.5 |
| 600 | r = n/4, alpha 4, keep: T 10 / 200 | 1.980 / **1.978** | +5.9% / +5.7% |
| 600 | r = n/4, alpha 4, T 50: moments reset / transfer | 2.225 / 2.112 | +18.9% / +12.9% |
| 600 | r = n/4, alpha 4, T 1, moments transfer (Flora-like) | - | loss not finite at step 48 |
| 600 | r = n/4, T 200, keep: alpha 3 / 6 | 2.333 / 2.528 | +24.7% / +35.1%: left the plateau at step 500 / never |
| 1200 | batch 16 (the same tokens): uncompressed / r = n/4, alpha 4, T 200 | 1.808 / 2.530 | +40%: the compressed run stayed on the plateau |
| 2000 | uncompressed, lr 3e-3 | **1.600** | |
| 2000 | r = n/4, keep, T 200: alpha 4 / 2 | 1.737 / 1.739 | +8.55% / +8.64% |
| 2000 | r = n/4, keep, T 50, alpha 1 (the committed run) | **1.700** | **+6.23%** |
| 2000, stopped at 1000 | r = n/4, alpha 4, T 20 | 2.013 | +15.2% (T 200 at step 1000: +8.0%) |
| 2000, stopped at 700 | r = n/4, alpha 4, T 500 | 1.969 | +7.1% (T 200 at step 700: +7.6%) |
| 2000, stopped at 1200 | r = n/2, alpha 4, T 200 | 1.884 | +10.7% (r = n/4 at step 1200: +8.6%): alpha 4 is too large at n/2 |
| 2000 | r = n/2, keep, T 200, alpha 2 | 1.656 | +3.50% |
| 1000 | C = 256, H = 8, F = 688 (r = 64 for q/k/v and gate/up, 172 for down): uncompressed lr 3e-3 / 1.5e-3; r = n/4 at lr 3e-3, alpha 1, T 50, keep | 1.778 / **1.660** / **1.692** | -4.8% / **+1.94%** (C = 128 at step 1000: +6.6%) |

The committed run uses the best of these at 2000 steps: alpha 1, T 50, keep (the program's defaults). The
600-step runs pointed elsewhere (alpha 4, T 200 led there, and ends 2.3 points worse at 2000 steps): short
runs rank these settings poorly. They also show how much more fragile the compressed runs are: with alpha
3, 6 or 8, or at batch 16, they left the plateau late or not at all, which every uncompressed run did by
step 300. The wider model (the C = 256 row, 1000 steps, whole validation split) is what the paper's scale
suggests: with r = 64 instead of 32 the compressed run ends 1.9% above the better of two uncompressed
runs, inside the target, and below the uncompressed run at the committed lr (which is too high for the
wider model; the compressed groups' step, one random quarter of the input space at a time, is smaller).
It takes 4x the time per step, which is why the committed 2000-step pair stays at C = 128. Not tried: a
schedule or weight decay of their own for the compressed groups, gradient clipping, and much longer runs:
the paper pretrains for 10^4 steps and more on models with n = 512 to 2048, and its n/4 runs end 1% to
16% above the uncompressed perplexity (0.3% to 5% in loss; SPEC section 7), where the committed run ends
10% above it (6.2% in loss).
EOF
} > "$md"
echo "wrote $md and $png" >&2
