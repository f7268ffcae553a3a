# Plots examples/char_transformer's loss curves (its --curves files): left, the training loss (mean batch
# loss since the previous evaluation, dashed) and the validation loss (solid) of both runs against the
# step; right, the compressed run's validation loss relative to the uncompressed one's, with the 3% target.
#   gnuplot -e "full='curve.full.csv'; compressed='curve.compressed.csv'; out='char_transformer.png'; \
#               label='r = n/4'" bench/plot_char_transformer.gp
# Each file has the columns step,train_loss,val_loss; step 0 (the initial model) has no training loss (NaN).
if (!exists("full")) full = 'curve.full.csv'
if (!exists("compressed")) compressed = 'curve.compressed.csv'
if (!exists("out")) out = 'char_transformer.png'
if (!exists("label")) label = 'compressed'

set terminal pngcairo size 1200,480 font 'sans,10'
set output out
set datafile separator ','
set datafile missing 'NaN'
set key top right
set grid
set multiplot layout 1,2 title 'Character-level transformer on fortunes: uncompressed and compressed activations'

set title 'loss (nats per character)'
set xlabel 'step'
set ylabel 'cross-entropy'
set yrange [*:3.5]
plot full using 1:3 skip 1 with linespoints pointsize 0.5 lc rgb '#1f77b4' title 'uncompressed, validation', \
     compressed using 1:3 skip 1 with linespoints pointsize 0.5 lc rgb '#d62728' title label . ', validation', \
     full using 1:2 skip 1 with lines dashtype 2 lc rgb '#1f77b4' title 'uncompressed, training', \
     compressed using 1:2 skip 1 with lines dashtype 2 lc rgb '#d62728' title label . ', training'

set title 'validation loss of the compressed run relative to the uncompressed one'
set ylabel 'relative difference (%)'
set yrange [*:*]
set key top right
plot '< paste -d, '.full.' '.compressed using 1:(100 * ($6 - $3) / $3) skip 1 with linespoints pointsize 0.5 \
         lc rgb '#d62728' title label, \
     3 with lines dashtype 2 lc rgb 'black' title 'target: 3%'

unset multiplot
