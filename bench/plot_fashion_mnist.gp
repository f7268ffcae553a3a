# Plots examples/fashion_mnist's per-epoch curves (its --curves file): training loss and test accuracy
# against epoch, one line per configuration.
#   gnuplot -e "data='curves.tsv'; out='fashion_mnist.png'" bench/plot_fashion_mnist.gp
# The data file has one block per configuration (blocks separated by two blank lines), columns:
# config, epoch, train_loss, train_accuracy, test_loss, test_accuracy, seconds. Epoch 0 is the initial
# model, whose training loss is NaN; both panels start at epoch 1.
if (!exists("data")) data = 'fashion_mnist.tsv'
if (!exists("out")) out = 'fashion_mnist.png'

names = system("awk '!/^#/ && NF && $1 != last { printf \"%s \", $1; last = $1 }' " . data)
blocks = words(names)

set terminal pngcairo size 1200,480 font 'sans,10'
set output out
set datafile separator '\t'
set datafile missing 'NaN'
set grid
set xrange [1:*]
set xtics 1
set multiplot layout 1,2 title 'Fashion-MNIST, MLP 784-1024-1024-10: uncompressed and compressed activations'

set title 'training loss (mean over the epoch)'
set xlabel 'epoch'
set ylabel 'cross-entropy'
set logscale y
set key top right
plot for [i = 1:blocks] data index (i - 1) using 2:3 with linespoints pointsize 0.6 title word(names, i)

set title 'test accuracy (10000 images)'
set ylabel 'accuracy (%)'
unset logscale y
set yrange [84:*]
set key bottom right
plot for [i = 1:blocks] data index (i - 1) using 2:(100 * $6) with linespoints pointsize 0.6 title word(names, i)

unset multiplot
