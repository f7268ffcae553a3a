// fashion_mnist: a 784-1024-1024-10 MLP on Fashion-MNIST, trained uncompressed and with compressed
// activations, from the same initial weights on the same batches.
//
// The model, written out around three compact::linear_layer:
//
//   X (N, 784) -> fc1 -> ReLU -> H1 (N, 1024) -> fc2 -> ReLU -> H2 (N, 1024) -> fc3 -> logits (N, 10)
//   loss: softmax cross-entropy, averaged over the batch
//
// Configurations (one row each in the final table; --configs picks some):
//   full  rank::full: r = n with P = I, exactly the uncompressed layers and plain AdamW;
//   n/2, n/4, n/8  rank::ratio<1, k>: every layer keeps Z = X P (N, n/k) for backward instead of its
//         input X (N, n), and AdamW runs in that (n/k)-dimensional subspace (SPEC sections 2-3).
//   alam  the quantized policy: each layer keeps its input X in an activation store, with bit widths
//         chosen by ALAM's allocator: a budget of 1 bit per value on average, the ladder 8, 4, 2, 1 bits
//         (groups of 128) and average quantization (0.5 bit), sensitivities from GradNormVar probes at
//         step 0 and at 10% of the run (SPEC section 5). The weight gradient is the full dY^T X^.
//   gact  the same with GACT's allocator: a budget of 4 bits per value, the ladder 8, 4, 2, 1 bits in
//         groups of 256 and no averaging, sensitivities from probes of the flat gradient every 1000 steps.
// Each configuration trains in a forked child process, so that the peak resident memory reported for it
// (the child's ru_maxrss, from wait4) is its own; the child sends its figures back through a pipe.
//
// Saved activations per step, counted exactly: the three layers' saved_bytes(N) (Z1, Z2, Z3; for full
// these are copies of X, H1, H2) plus the two ReLU masks this program keeps for backward, one bit per
// hidden unit. Not counted: the buffers reused every step that backward does not read (H1, H2, logits,
// dH), and the input batch, which the data set holds anyway.
//
// Data: the IDX files of Debian's dataset-fashion-mnist package (bash .ci/deps dataset-fashion-mnist),
// read from /usr/share/datasets/fashion-mnist or --data DIR, gzip-compressed (decompressed by running
// `gzip -dc`, present on every Debian system) or not. Headers are validated: magic numbers 2051 (images)
// and 2049 (labels), 28x28 images, 60000 training and 10000 test items, labels below 10. Pixels are
// scaled to [0, 1] and standardised with the training set's mean and standard deviation.
//
// For alam and gact the table's "ranks" column shows each layer's store (int4/g256: 4-bit codes in
// groups of 256; aq/g128: average quantization) as allocated at the end of the run, and the saved bytes
// are those of that allocation (codes and per-group metadata). A probe reruns forward and backward on
// the step's batch with one store changed and no optimizer step (9 reruns per estimate); the probes are
// included in the epoch's time.
//
// Hyper-parameters: see `configurations` below, where each row's recipe is set and explained. The
// learning rate follows a cosine from its peak to 0 over the run (--constant-lr keeps it flat).
//
// Time: compression is not faster here. Per step a compressed layer does 2 N n m + N r (n + m)
// multiply-adds plus m r n in the optimizer (G_sub P^T), against 3 N n m; with N = 128 rows that last
// term, which does not shrink with N, is nearly as large as the rest at r = n/4. On top of it each layer
// regenerates its Gaussian P (n, r) in every forward and every step; --keep-projection keeps P for the T
// updates it lasts (n r more floats per layer). What compression saves is memory.
//
// Usage: fashion_mnist [--epochs E] [--batch N] [--threads T] [--train-limit K] [--test-limit K]
//                      [--configs full,n/2,n/4,n/8,alam,gact] [--lr X] [--alpha A] [--gap T]
//                      [--moments keep|reset|transfer] [--keep-projection] [--constant-lr] [--hidden H]
//                      [--seed S] [--data DIR] [--curves FILE] [--markdown] [--smoke]
//   --epochs E       passes over the training set (default 2)
//   --batch N        rows per step (default 128)
//   --threads T      CPU threads (default 0: all OpenMP threads)
//   --train-limit K  train on the first K training images only (default: all 60000)
//   --test-limit K   evaluate on the first K test images only (default: all 10000)
//   --configs LIST   comma-separated configuration names (default: all)
//   --lr X           learning rate of every configuration (default: each configuration's own)
//   --alpha A, --gap T, --moments P
//                    subspace scale, resampling gap and moment policy of the compressed configurations
//   --keep-projection  keep each layer's P for its epoch instead of regenerating it (the same numbers,
//                    faster, n r floats more per layer)
//   --constant-lr    no cosine decay
//   --seed S         seed of the initial weights, the shuffles and the projections (default 2024)
//   --hidden H       width of the two hidden layers (default 1024)
//   --curves FILE    write per-epoch train loss, test loss and test accuracy as tab-separated values
//   --markdown       print the table as Markdown
//   --smoke          8 steps per configuration on a slice of the data (or on generated IDX files when
//                    the package is absent), hidden width 256, one thread; checks that the IDX reader
//                    rejects corrupt headers, that the test loss falls, that each projected layer's
//                    saved bytes shrink by exactly n/r, and that each store's bytes are what its
//                    allocated scheme stores, within the allocator's budget
#include <compact/compact.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

using compact::index_t;
using clock_type = std::chrono::steady_clock;

constexpr index_t image_side = 28;
constexpr index_t pixels = image_side * image_side;
constexpr index_t classes = 10;
constexpr int layer_count = 3;

// IDX files (http://yann.lecun.com/exdb/mnist/ describes the format): a big-endian header, then bytes.

constexpr std::uint32_t idx_images_magic = 2051; // unsigned bytes, 3 dimensions
constexpr std::uint32_t idx_labels_magic = 2049; // unsigned bytes, 1 dimension

std::runtime_error data_error(const std::string& path, const std::string& what)
{
    return std::runtime_error(path + ": " + what);
}

std::uint32_t read_big_endian(const unsigned char* p)
{
    return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | std::uint32_t{p[3]};
}

void write_big_endian(std::vector<unsigned char>& out, std::uint32_t value)
{
    for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<unsigned char>(value >> shift));
}

// A path as one single-quoted shell word.
std::string shell_quote(const std::string& s)
{
    std::string out = "'";
    for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out + "'";
}

bool ends_with(const std::string& s, const std::string& suffix)
{
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

// The whole file, decompressed through `gzip -dc` when the name ends in .gz.
std::vector<unsigned char> read_file(const std::string& path)
{
    if (!ends_with(path, ".gz")) {
        std::ifstream in(path, std::ios::binary);
        if (!in) throw data_error(path, "cannot be opened");
        return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    }
    const std::string command = "gzip -dc -- " + shell_quote(path);
    FILE* pipe = popen(command.c_str(), "r");
    if (!pipe) throw data_error(path, "cannot run `" + command + "`");
    std::vector<unsigned char> out;
    std::array<unsigned char, 1 << 16> chunk{};
    for (std::size_t got; (got = std::fread(chunk.data(), 1, chunk.size(), pipe)) > 0;)
        out.insert(out.end(), chunk.begin(), chunk.begin() + static_cast<std::ptrdiff_t>(got));
    const int status = pclose(pipe);
    if (status != 0)
        throw data_error(path, "`" + command + "` failed (wait status " + std::to_string(status) +
                                   "): not a complete gzip file, or gzip is not installed");
    return out;
}

// Pixels (count, 784) of an IDX image file's bytes, after checking the header against `count`.
std::vector<std::uint8_t> parse_images(const std::vector<unsigned char>& bytes, const std::string& path, index_t count)
{
    constexpr std::size_t header = 16;
    if (bytes.size() < header)
        throw data_error(path, std::to_string(bytes.size()) + " bytes is too short for an IDX image header (16 bytes)");
    const std::uint32_t magic = read_big_endian(bytes.data());
    if (magic != idx_images_magic)
        throw data_error(path, "magic number " + std::to_string(magic) + ", expected " +
                                   std::to_string(idx_images_magic) + " (IDX images: unsigned bytes, 3 dimensions)");
    const std::uint32_t items = read_big_endian(bytes.data() + 4);
    const std::uint32_t rows = read_big_endian(bytes.data() + 8), cols = read_big_endian(bytes.data() + 12);
    if (items != static_cast<std::uint64_t>(count))
        throw data_error(path, "holds " + std::to_string(items) + " images, expected " + std::to_string(count));
    if (rows != image_side || cols != image_side)
        throw data_error(path, "images are " + std::to_string(rows) + "x" + std::to_string(cols) + ", expected 28x28");
    const std::size_t expected = header + static_cast<std::size_t>(count * pixels);
    if (bytes.size() != expected)
        throw data_error(path, std::to_string(bytes.size()) + " bytes, expected " + std::to_string(expected) +
                                   " (a 16-byte header and " + std::to_string(count) + " images of 784 bytes)");
    return {bytes.begin() + header, bytes.end()};
}

// Labels (count) of an IDX label file's bytes, after checking the header against `count`.
std::vector<std::uint8_t> parse_labels(const std::vector<unsigned char>& bytes, const std::string& path, index_t count)
{
    constexpr std::size_t header = 8;
    if (bytes.size() < header)
        throw data_error(path, std::to_string(bytes.size()) + " bytes is too short for an IDX label header (8 bytes)");
    const std::uint32_t magic = read_big_endian(bytes.data());
    if (magic != idx_labels_magic)
        throw data_error(path, "magic number " + std::to_string(magic) + ", expected " +
                                   std::to_string(idx_labels_magic) + " (IDX labels: unsigned bytes, 1 dimension)");
    const std::uint32_t items = read_big_endian(bytes.data() + 4);
    if (items != static_cast<std::uint64_t>(count))
        throw data_error(path, "holds " + std::to_string(items) + " labels, expected " + std::to_string(count));
    if (bytes.size() != header + static_cast<std::size_t>(count))
        throw data_error(path, std::to_string(bytes.size()) + " bytes, expected " +
                                   std::to_string(header + static_cast<std::size_t>(count)) +
                                   " (an 8-byte header and one byte per label)");
    for (std::size_t i = header; i < bytes.size(); ++i)
        if (bytes[i] >= classes)
            throw data_error(path, "label " + std::to_string(bytes[i]) + " at index " + std::to_string(i - header) +
                                       " is not below 10");
    return {bytes.begin() + header, bytes.end()};
}

// One split of the data set: `count` images (count, 784) and their labels (count), both bytes.
struct image_set {
    index_t count = 0;
    std::vector<std::uint8_t> images;
    std::vector<std::uint8_t> labels;
};

// The file `dir/name`, or `dir/name.gz`.
std::string find_idx(const std::string& dir, const std::string& name)
{
    const std::string plain = dir + "/" + name;
    if (file_exists(plain)) return plain;
    if (file_exists(plain + ".gz")) return plain + ".gz";
    throw std::runtime_error("missing " + plain + ".gz (or " + plain + "): install the data set with `bash .ci/deps "
                             "dataset-fashion-mnist`, or point --data at a directory holding the IDX files");
}

struct split_files {
    const char* images;
    const char* labels;
    index_t count; // items both files must hold
};
constexpr split_files train_split{"train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000};
constexpr split_files test_split{"t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000};

image_set load_split(const std::string& dir, const split_files& files)
{
    const std::string images = find_idx(dir, files.images), labels = find_idx(dir, files.labels);
    image_set out;
    out.count = files.count;
    out.images = parse_images(read_file(images), images, files.count);
    out.labels = parse_labels(read_file(labels), labels, files.count);
    return out;
}

// The first `limit` items of `set` (all when limit is 0 or larger than the set).
void truncate(image_set& set, index_t limit)
{
    if (limit <= 0 || limit >= set.count) return;
    set.count = limit;
    set.images.resize(static_cast<std::size_t>(limit * pixels));
    set.labels.resize(static_cast<std::size_t>(limit));
}

// Generated IDX files, for --smoke on machines without the data set: each class is a fixed random
// pattern of bright pixels plus noise, written through `gzip -c` so that the real reading path is used.

std::uint64_t splitmix64(std::uint64_t& state)
{
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void write_gzip(const std::string& path, const std::vector<unsigned char>& bytes)
{
    const std::string command = "gzip -c > " + shell_quote(path);
    FILE* pipe = popen(command.c_str(), "w");
    if (!pipe) throw data_error(path, "cannot run `" + command + "`");
    const std::size_t written = std::fwrite(bytes.data(), 1, bytes.size(), pipe);
    if (pclose(pipe) != 0 || written != bytes.size()) throw data_error(path, "`" + command + "` failed");
}

void write_generated_split(const std::string& dir, const split_files& files, std::uint64_t seed)
{
    std::uint64_t state = 77;
    std::vector<std::uint8_t> pattern(static_cast<std::size_t>(classes * pixels)); // (10, 784): 0 or 1
    for (auto& p : pattern) p = static_cast<std::uint8_t>(splitmix64(state) % 4 == 0);
    std::vector<unsigned char> images, labels;
    write_big_endian(images, idx_images_magic);
    write_big_endian(images, static_cast<std::uint32_t>(files.count));
    write_big_endian(images, image_side);
    write_big_endian(images, image_side);
    write_big_endian(labels, idx_labels_magic);
    write_big_endian(labels, static_cast<std::uint32_t>(files.count));
    state = seed;
    for (index_t i = 0; i < files.count; ++i) {
        const auto label = static_cast<std::size_t>(splitmix64(state) % classes);
        labels.push_back(static_cast<unsigned char>(label));
        for (index_t p = 0; p < pixels; ++p) {
            const auto noise = static_cast<unsigned>(splitmix64(state) % 96);
            images.push_back(static_cast<unsigned char>(pattern[label * pixels + static_cast<std::size_t>(p)] * 150 + noise));
        }
    }
    write_gzip(dir + "/" + files.images + ".gz", images);
    write_gzip(dir + "/" + files.labels + ".gz", labels);
}

// Settings, recipes and per-run results.

struct recipe {
    double lr = 1e-3;
    double alpha = 1.0;                                     // subspace scale (1 for the identity)
    std::uint64_t gap = 0;                                  // T: updates between new projections
    compact::moment_policy moments = compact::moment_policy::keep;
    double weight_decay = 0.0;
};

struct settings {
    std::string data_dir = "/usr/share/datasets/fashion-mnist";
    int epochs = 2;
    index_t batch = 128;
    index_t hidden = 1024;
    int threads = 0;
    index_t train_limit = 0;
    index_t test_limit = 0;
    std::vector<std::string> configs; // empty: all
    std::optional<double> lr, alpha;
    std::optional<std::uint64_t> gap;
    std::optional<compact::moment_policy> moments;
    std::uint64_t seed = 2024;
    std::string curves;
    bool keep_projection = false;
    bool cosine = true; // lr follows a cosine from its peak to 0 over the run; false: constant
    bool markdown = false;
    bool smoke = false;
};

// Both splits and the pixel standardisation (from the training set).
struct data_set {
    image_set train, test;
    float mean = 0, inv_std = 1;
};

// One row of the per-epoch curves; epoch 0 is the initial model (no training loss yet: NaN).
struct epoch_record {
    double train_loss = 0;     // mean batch loss over the epoch
    double train_accuracy = 0; // fraction of training rows classified right while training
    double test_loss = 0;
    double test_accuracy = 0;
    double seconds = 0; // training time of the epoch (evaluation excluded)
};

// What a child process reports for its configuration (plain data: sent through a pipe as bytes).
struct run_summary {
    std::array<index_t, layer_count> in{}, rank{};
    std::array<std::uint64_t, layer_count> saved_layer_bytes{}; // saved_bytes(batch) of each layer
    std::uint64_t mask_bytes = 0;                               // the two ReLU masks, 1 bit per unit
    std::uint64_t state_bytes = 0;                              // optimizer moments of all parameters
    std::uint64_t projection_bytes = 0;                         // kept P of all layers (--keep-projection)
    index_t rows = 0;                                           // N of saved_layer_bytes: the batch
    bool projected = true; // saved bytes are N r values per layer (SPEC section 2): --smoke checks n/r
    // Quantized stores (projected false): each layer's scheme at the end of the run, the allocator's
    // budget in bits per value (nominal: metadata not charged) and how many allocations it made.
    std::array<compact::store_scheme, layer_count> schemes{};
    double budget_bits = 0;
    int allocations = 0;
    recipe used{};
    int epochs = 0; // epoch_records that follow: epochs + 1 (epoch 0 first)
};

struct run_result {
    std::string name;
    run_summary summary{};
    std::vector<epoch_record> curve; // epochs + 1
    long peak_rss_kib = 0;
    bool ok = false;
};

std::uint64_t saved_activation_bytes(const run_summary& s)
{
    std::uint64_t total = s.mask_bytes;
    for (std::uint64_t b : s.saved_layer_bytes) total += b;
    return total;
}

// The stores' mean nominal bits per value (what an allocation budget charges) over a full batch.
double nominal_bits_per_value(const run_summary& m)
{
    double bits = 0, values = 0;
    for (std::size_t l = 0; l < m.schemes.size(); ++l) {
        const auto count = static_cast<double>(m.rows * m.in[l]);
        bits += compact::nominal_bits<float>(m.schemes[l]) * count;
        values += count;
    }
    return bits / values;
}

// Progress: a bar on a terminal, otherwise one line per epoch; both on stderr.

class progress {
public:
    progress(const std::string& name, int epochs, index_t steps)
        : name_(name), epochs_(epochs), steps_(steps), tty_(isatty(STDERR_FILENO) == 1)
    {
    }

    // After `done` of the epoch's steps, whose training began at `start`.
    void step(int epoch, index_t done, double mean_loss, clock_type::time_point start)
    {
        if (!tty_) return;
        const index_t width = 30;
        const index_t filled = done * width / steps_;
        if (done != steps_ && filled == last_filled_ && done % 20 != 0) return;
        last_filled_ = filled;
        const double elapsed = std::chrono::duration<double>(clock_type::now() - start).count();
        const double left = elapsed * static_cast<double>(steps_ - done) / static_cast<double>(done);
        std::fprintf(stderr, "\r  %-5s epoch %d/%d [%s%s] %3d%%  loss %.4f  %.0f s left in the epoch ", name_.c_str(),
                     epoch, epochs_, std::string(static_cast<std::size_t>(filled), '#').c_str(),
                     std::string(static_cast<std::size_t>(width - filled), '.').c_str(),
                     static_cast<int>(100 * done / steps_), mean_loss, left);
        std::fflush(stderr);
    }

    void epoch_done(int epoch, const epoch_record& r)
    {
        std::fprintf(stderr, "%s  %-5s epoch %d/%d  train loss %.4f  test loss %.4f  test accuracy %.2f%%  %.1f s\n",
                     tty_ ? "\r\033[K" : "", name_.c_str(), epoch, epochs_, r.train_loss, r.test_loss,
                     100.0 * r.test_accuracy, r.seconds);
        last_filled_ = -1;
    }

private:
    std::string name_;
    int epochs_;
    index_t steps_;
    bool tty_;
    index_t last_filled_ = -1;
};

// The model's pieces around the layers.

template <class Layer>
void init_uniform(Layer& layer, std::uint64_t seed, std::uint64_t stream)
{
    // PyTorch's nn.Linear initialisation: W and b uniform in [-1/sqrt(in), 1/sqrt(in)).
    const double bound = 1.0 / std::sqrt(static_cast<double>(layer.in()));
    compact::fill_uniform(layer.weight(), -bound, bound, seed, stream);
    compact::fill_uniform(compact::make_view(layer.bias(), 1, layer.out()), -bound, bound, seed, stream + 1);
}

// X (rows, 784) = standardised pixels of items order[first, first + rows); labels (rows).
void gather(const data_set& d, const image_set& set, const std::vector<index_t>& order, index_t first,
            compact::matrix_view<float> x, std::vector<int>& labels)
{
    labels.resize(static_cast<std::size_t>(x.rows));
    for (index_t i = 0; i < x.rows; ++i) {
        const index_t item = order[static_cast<std::size_t>(first + i)];
        const std::uint8_t* src = set.images.data() + item * pixels;
        float* dst = x.row(i);
        for (index_t p = 0; p < pixels; ++p) dst[p] = (static_cast<float>(src[p]) * (1.0f / 255.0f) - d.mean) * d.inv_std;
        labels[static_cast<std::size_t>(i)] = set.labels[static_cast<std::size_t>(item)];
    }
}

struct score {
    double loss = 0;     // summed cross-entropy
    index_t correct = 0; // rows whose largest logit is the label
};

// Softmax cross-entropy of logits (N, 10) against labels (N). Writes dlogits (N, 10), the gradient of
// the batch mean, unless it is an empty view.
score cross_entropy(compact::const_matrix_view<float> logits, const std::vector<int>& labels,
                    compact::matrix_view<float> dlogits)
{
    score out;
    const double scale = 1.0 / static_cast<double>(logits.rows);
    for (index_t i = 0; i < logits.rows; ++i) {
        const float* z = logits.row(i);
        const float top = *std::max_element(z, z + logits.cols);
        double sum = 0;
        for (index_t j = 0; j < logits.cols; ++j) sum += std::exp(static_cast<double>(z[j] - top));
        const int y = labels[static_cast<std::size_t>(i)];
        out.loss += std::log(sum) - static_cast<double>(z[y] - top);
        if (z[y] == top) ++out.correct;
        if (dlogits.empty()) continue;
        for (index_t j = 0; j < logits.cols; ++j) {
            const double p = std::exp(static_cast<double>(z[j] - top)) / sum;
            dlogits(i, j) = static_cast<float>((p - (j == y ? 1.0 : 0.0)) * scale);
        }
    }
    return out;
}

// A deterministic shuffle of 0 .. count-1 for `epoch` (Fisher-Yates on splitmix64).
std::vector<index_t> shuffled(index_t count, std::uint64_t seed, int epoch)
{
    std::vector<index_t> order(static_cast<std::size_t>(count));
    for (index_t i = 0; i < count; ++i) order[static_cast<std::size_t>(i)] = i;
    std::uint64_t state = seed * 1000003u + static_cast<std::uint64_t>(epoch);
    for (index_t i = count - 1; i > 0; --i)
        std::swap(order[static_cast<std::size_t>(i)],
                  order[static_cast<std::size_t>(splitmix64(state) % static_cast<std::uint64_t>(i + 1))]);
    return order;
}

// Training one configuration: the three layers share the policy (a rank policy, or compact::quantized).

template <class Policy>
class mlp {
public:
    using layer = compact::linear_layer<float, Policy, compact::cpu>;

    mlp(const settings& s, const recipe& r, Policy policy = {})
        : fc1_(compact::in_features{pixels}, compact::out_features{s.hidden}, options(s, r, 1), policy),
          fc2_(compact::in_features{s.hidden}, compact::out_features{s.hidden}, options(s, r, 2), policy),
          fc3_(compact::in_features{s.hidden}, compact::out_features{classes}, options(s, r, 3), policy),
          x_(static_cast<std::size_t>(s.batch * pixels)),
          h1_(static_cast<std::size_t>(s.batch * s.hidden)),
          h2_(h1_.size()),
          dh1_(h1_.size()),
          dh2_(h1_.size()),
          logits_(static_cast<std::size_t>(s.batch * classes)),
          dlogits_(logits_.size()),
          mask1_(compact::mask_bytes(s.batch, s.hidden)),
          mask2_(mask1_.size())
    {
        // Every configuration starts from the same weights: the streams do not depend on Policy.
        init_uniform(fc1_, s.seed, 10);
        init_uniform(fc2_, s.seed, 12);
        init_uniform(fc3_, s.seed, 14);
    }

    // Forward and backward on X (N, 784) and labels (N), N <= batch, leaving the gradients in the
    // layers. Returns the batch's summed loss and hits.
    score forward_backward(const compact::cpu::context& ctx, index_t rows, const std::vector<int>& labels)
    {
        const auto x = buffer(x_, rows, pixels);
        const auto h1 = buffer(h1_, rows, fc1_.out()), h2 = buffer(h2_, rows, fc2_.out());
        const auto dh1 = buffer(dh1_, rows, fc1_.out()), dh2 = buffer(dh2_, rows, fc2_.out());
        const auto logits = buffer(logits_, rows, classes), dlogits = buffer(dlogits_, rows, classes);
        fc1_.forward(ctx, x, h1); // keeps Z1 = X P1 (N, r1)
        relu(ctx, h1, mask1_);    // keeps 1 bit per unit of H1
        fc2_.forward(ctx, h1, h2); // keeps Z2 = H1 P2 (N, r2)
        relu(ctx, h2, mask2_);
        fc3_.forward(ctx, h2, logits); // keeps Z3 = H2 P3 (N, r3)
        const score s = cross_entropy(logits, labels, dlogits);
        fc3_.backward(ctx, dlogits, dh2); // dH2 = dY W3 exactly; G3 = dY^T Z3 (10, r3)
        relu_backward(ctx, mask2_, dh2);
        fc2_.backward(ctx, dh2, dh1);
        relu_backward(ctx, mask1_, dh1);
        fc1_.backward(ctx, dh1, {}); // the input needs no gradient
        return s;
    }

    void step(const compact::cpu::context& ctx, const compact::adamw_params& hyper)
    {
        for (layer* l : layers()) l->step(ctx, hyper);
    }

    // A sensitivity probe: every parameter gradient of the last backward, in a fixed order; then the
    // gradients are dropped, so that the probe's backward never reaches the optimizer.
    void probe_gradients(compact::gradient_probe& probe)
    {
        for (layer* l : layers()) {
            probe.add(l->gradient());
            probe.add(l->bias_gradient(), static_cast<std::size_t>(l->out()));
            l->discard_gradient();
        }
    }

    std::array<layer*, layer_count> layers() noexcept { return {&fc1_, &fc2_, &fc3_}; }

    // The input buffer X (rows, 784) of the next forward_backward.
    compact::matrix_view<float> input(index_t rows) { return buffer(x_, rows, pixels); }

    // Inference keeps nothing for backward: the layers' plain forward (no Z), in chunks of `batch` rows
    // (at most the training batch: the buffers are the training step's).
    score evaluate(const compact::cpu::context& ctx, const data_set& d, const image_set& set, index_t batch)
    {
        std::vector<index_t> order(static_cast<std::size_t>(set.count));
        for (index_t i = 0; i < set.count; ++i) order[static_cast<std::size_t>(i)] = i;
        std::vector<int> labels;
        score total;
        for (index_t first = 0; first < set.count; first += batch) {
            const index_t rows = std::min(batch, set.count - first);
            const auto x = buffer(x_, rows, pixels);
            const auto h1 = buffer(h1_, rows, fc1_.out()), h2 = buffer(h2_, rows, fc2_.out());
            const auto logits = buffer(logits_, rows, classes);
            gather(d, set, order, first, x, labels);
            fc1_.layer().forward(ctx, x, fc1_.weight(), bias(fc1_), h1);
            relu(ctx, h1, mask1_);
            fc2_.layer().forward(ctx, h1, fc2_.weight(), bias(fc2_), h2);
            relu(ctx, h2, mask2_);
            fc3_.layer().forward(ctx, h2, fc3_.weight(), bias(fc3_), logits);
            const score s = cross_entropy(logits, labels, {});
            total.loss += s.loss;
            total.correct += s.correct;
        }
        return total;
    }

    run_summary summary(index_t batch, const recipe& r) const
    {
        run_summary out;
        const std::array<const layer*, layer_count> layers{&fc1_, &fc2_, &fc3_};
        for (int l = 0; l < layer_count; ++l) {
            const auto i = static_cast<std::size_t>(l);
            out.in[i] = layers[i]->in();
            out.rank[i] = layers[i]->rank();
            out.saved_layer_bytes[i] = layers[i]->saved_bytes(batch);
            out.state_bytes += layers[i]->state_bytes();
            out.projection_bytes += layers[i]->projection_bytes();
        }
        out.mask_bytes = (mask1_.size() + mask2_.size()) * sizeof(std::uint8_t);
        out.rows = batch;
        out.used = r;
        if constexpr (!layer::layer_type::subspace) { // an activation store keeps X, not Z = X P
            out.projected = false;
            for (int l = 0; l < layer_count; ++l)
                out.schemes[static_cast<std::size_t>(l)] = layers[static_cast<std::size_t>(l)]->compressor().scheme();
        }
        return out;
    }

private:
    static compact::linear_options options(const settings& s, const recipe& r, std::uint64_t id)
    {
        compact::linear_options o;
        o.seed = s.seed;         // P is regenerated from (seed, layer id, epoch), never stored
        o.layer = id;
        o.max_rows = s.batch;    // sizes the saved Z (N, r)
        o.resample.gap = r.gap;  // T: a new P every `gap` updates
        o.moments = r.moments;   // what AdamW's moments do when P changes
        o.keep_projection = s.keep_projection; // P (n, r) kept for its epoch instead of regenerated
        return o;
    }

    static compact::matrix_view<float> buffer(std::vector<float>& storage, index_t rows, index_t cols)
    {
        return compact::make_view(storage.data(), rows, cols);
    }

    // A layer's bias as the (1, m) view the caller-memory forward takes.
    static compact::const_matrix_view<float> bias(const layer& l) { return compact::make_view(l.bias(), 1, l.out()); }

    // In place H = max(H, 0), keeping the mask of H > 0: one bit per value (compact/compress/mask.hpp).
    static void relu(const compact::cpu::context& ctx, compact::matrix_view<float> h, std::vector<std::uint8_t>& mask)
    {
        compact::relu_forward<compact::cpu, float>(ctx, h, h, {mask.data(), mask.size()});
    }

    // In place dH = dH where H > 0, else 0, from the mask.
    static void relu_backward(const compact::cpu::context& ctx, const std::vector<std::uint8_t>& mask,
                              compact::matrix_view<float> dh)
    {
        compact::relu_backward<compact::cpu, float>(ctx, mask.data(), dh, dh);
    }

    layer fc1_, fc2_, fc3_;
    std::vector<float> x_;              // (batch, 784)
    std::vector<float> h1_, h2_;        // (batch, hidden) ReLU outputs, read only by the next layer
    std::vector<float> dh1_, dh2_;      // (batch, hidden)
    std::vector<float> logits_;         // (batch, 10)
    std::vector<float> dlogits_;        // (batch, 10)
    std::vector<std::uint8_t> mask1_, mask2_; // (batch * hidden) bits: H > 0, kept for backward
};

// Trains `model` for s.epochs; returns its per-epoch curve (epoch 0 first). before_step(ctx, global
// step, rows, labels) runs after each batch is gathered and before its training step.
template <class Model, class BeforeStep>
std::vector<epoch_record> train(Model& model, const std::string& name, const settings& s, const data_set& d,
                                const recipe& r, BeforeStep&& before_step)
{
    const compact::cpu::context ctx{s.threads};
    compact::adamw_params hyper;
    hyper.lr = r.lr;
    hyper.alpha = r.alpha; // W -= lr alpha N P^T in the subspace; biases get plain AdamW at lr
    hyper.weight_decay = r.weight_decay;

    const index_t steps = (d.train.count + s.batch - 1) / s.batch;
    progress bar(name, s.epochs, steps);
    std::vector<epoch_record> curve;
    const auto test_score = [&](epoch_record& e) {
        const score t = model.evaluate(ctx, d, d.test, s.batch);
        e.test_loss = t.loss / static_cast<double>(d.test.count);
        e.test_accuracy = static_cast<double>(t.correct) / static_cast<double>(d.test.count);
    };
    epoch_record initial;
    initial.train_loss = initial.train_accuracy = std::nan("");
    test_score(initial);
    curve.push_back(initial);

    std::vector<int> labels;
    const double total_steps = static_cast<double>(steps) * s.epochs;
    for (int epoch = 1; epoch <= s.epochs; ++epoch) {
        const std::vector<index_t> order = shuffled(d.train.count, s.seed, epoch);
        const auto start = clock_type::now();
        double loss = 0;
        index_t correct = 0;
        for (index_t step = 0; step < steps; ++step) {
            const index_t first = step * s.batch, rows = std::min(s.batch, d.train.count - first);
            gather(d, d.train, order, first, model.input(rows), labels);
            if (s.cosine) {
                const double done = static_cast<double>((epoch - 1) * steps + step) / total_steps;
                hyper.lr = r.lr * 0.5 * (1.0 + std::cos(3.14159265358979323846 * done));
            }
            before_step(ctx, static_cast<std::uint64_t>(epoch - 1) * static_cast<std::uint64_t>(steps) +
                                 static_cast<std::uint64_t>(step),
                        rows, labels);
            const score b = model.forward_backward(ctx, rows, labels);
            model.step(ctx, hyper);
            loss += b.loss;
            correct += b.correct;
            bar.step(epoch, step + 1, loss / static_cast<double>(first + rows), start);
        }
        epoch_record e;
        e.seconds = std::chrono::duration<double>(clock_type::now() - start).count();
        e.train_loss = loss / static_cast<double>(d.train.count);
        e.train_accuracy = static_cast<double>(correct) / static_cast<double>(d.train.count);
        test_score(e);
        curve.push_back(e);
        bar.epoch_done(epoch, e);
    }
    return curve;
}

// A projection configuration: the three layers share the rank policy.
template <class Policy>
std::pair<run_summary, std::vector<epoch_record>> train_mlp(const std::string& name, const settings& s,
                                                            const data_set& d, const recipe& r)
{
    mlp<Policy> model(s, r);
    auto curve = train(model, name, s, d, r, [](const compact::cpu::context&, std::uint64_t, index_t,
                                                const std::vector<int>&) {});
    return {model.summary(s.batch, r), std::move(curve)};
}

// The bit allocators of the quantized configurations (SPEC section 5).
struct alam_allocator {
    static compact::bit_allocator make(std::uint64_t total_steps)
    {
        compact::allocation_options o;
        o.average_bits = 1;
        o.group = 128;
        o.average_rung = true;
        o.average_group = 128;
        return {o, compact::sensitivity_method::grad_norm_var,
                compact::allocation_schedule::start_and_fraction(total_steps, 0.1)};
    }
};

struct gact_allocator {
    static compact::bit_allocator make(std::uint64_t)
    {
        compact::allocation_options o;
        o.average_bits = 4;
        o.group = 256;
        o.average_rung = false;
        return {o, compact::sensitivity_method::gact, compact::allocation_schedule::every(1000)};
    }
};

// A quantized configuration: each layer keeps X in an activation store whose scheme the allocator sets
// at its scheduled steps, from probes that rerun forward and backward on the step's batch.
template <class Allocator>
std::pair<run_summary, std::vector<epoch_record>> train_quantized(const std::string& name, const settings& s,
                                                                  const data_set& d, const recipe& r)
{
    // The stores start at 8 bits, the widest quantized rung, so that an allocation never has to grow
    // the saved buffers (which linear_layer would do at the next forward).
    const compact::quantized policy{compact::store_scheme::quantized(8, 128)};
    mlp<compact::quantized> model(s, r, policy);
    const index_t steps = (d.train.count + s.batch - 1) / s.batch;
    compact::bit_allocator allocator = Allocator::make(static_cast<std::uint64_t>(steps) * static_cast<std::uint64_t>(s.epochs));
    // D_l: the values each store holds per full batch.
    for (auto* l : model.layers()) allocator.add(l->compressor().settings(), s.batch * l->in());
    int allocations = 0;
    auto curve = train(model, name, s, d, r,
                       [&](const compact::cpu::context& ctx, std::uint64_t step, index_t rows,
                           const std::vector<int>& labels) {
                           const bool changed = allocator.update(step, [&](compact::gradient_probe& probe) {
                               model.forward_backward(ctx, rows, labels);
                               model.probe_gradients(probe);
                           });
                           allocations += changed ? 1 : 0;
                       });
    run_summary summary = model.summary(s.batch, r);
    summary.budget_bits = allocator.options().average_bits;
    summary.allocations = allocations;
    return {summary, std::move(curve)};
}

// The configurations. A row is a name, a runner and a recipe; a new kind of layer (a quantized
// activation store, say) is a new runner function and one more row. A runner trains for s.epochs and
// returns its byte counts (run_summary; `projected` false where the saved bytes do not follow n/r)
// and the per-epoch curve, epoch 0 first.

using runner = std::pair<run_summary, std::vector<epoch_record>> (*)(const std::string&, const settings&,
                                                                     const data_set&, const recipe&);

struct configuration {
    const char* name; // as in --configs
    runner train;
    recipe defaults;
    bool compressed;  // --alpha, --gap and --moments apply
};

// Uncompressed: AdamW at lr 1e-3, the usual choice for this MLP.
constexpr recipe uncompressed_recipe{1e-3, 1.0, 0, compact::moment_policy::keep, 0.0};
// Compressed: the same lr with alpha = 1, so a step moves W about as far as plain AdamW's; a new P every
// T = 50 updates (the paper's T); moments reset when P changes. Tuned at n/4 over 5 epochs (the sweep
// is in bench/results/fashion_mnist.md): the paper's lr 1e-2 with alpha 0.25 scores the same, T = 10
// is a point worse, and reset beats keep (the paper's default) by 0.2-0.4 points.
constexpr recipe compressed_recipe{1e-3, 1.0, 50, compact::moment_policy::reset, 0.0};

const std::vector<configuration>& configurations()
{
    static const std::vector<configuration> all{
        // P = I: the uncompressed layers (Z is a copy of X) and plain AdamW.
        {"full", &train_mlp<compact::rank::full>, uncompressed_recipe, false},
        // Each layer keeps Z = X P (N, n/k) and runs AdamW in the (n/k)-dimensional subspace.
        {"n/2", &train_mlp<compact::rank::ratio<1, 2>>, compressed_recipe, true},
        {"n/4", &train_mlp<compact::rank::ratio<1, 4>>, compressed_recipe, true},
        {"n/8", &train_mlp<compact::rank::ratio<1, 8>>, compressed_recipe, true},
        // Each layer keeps X quantized, at the widths an allocator chooses; plain AdamW on the full
        // gradient dY^T X^, at the uncompressed lr.
        {"alam", &train_quantized<alam_allocator>, uncompressed_recipe, false},
        {"gact", &train_quantized<gact_allocator>, uncompressed_recipe, false},
    };
    return all;
}

recipe recipe_for(const configuration& c, const settings& s)
{
    recipe r = c.defaults;
    if (s.lr) r.lr = *s.lr;
    if (c.compressed) {
        if (s.alpha) r.alpha = *s.alpha;
        if (s.gap) r.gap = *s.gap;
        if (s.moments) r.moments = *s.moments;
    }
    return r;
}

// One configuration per child process: its peak resident memory is then its own.

bool write_all(int fd, const void* data, std::size_t bytes)
{
    const auto* p = static_cast<const char*>(data);
    while (bytes > 0) {
        const ssize_t n = write(fd, p, bytes);
        if (n <= 0) return false;
        p += n;
        bytes -= static_cast<std::size_t>(n);
    }
    return true;
}

std::vector<char> read_all(int fd)
{
    std::vector<char> out;
    std::array<char, 4096> chunk{};
    for (ssize_t n; (n = read(fd, chunk.data(), chunk.size())) > 0;) out.insert(out.end(), chunk.data(), chunk.data() + n);
    return out;
}

run_result run_configuration(const configuration& c, const settings& s, const data_set& d)
{
    run_result result;
    result.name = c.name;
    int fds[2];
    if (pipe(fds) != 0) throw std::runtime_error("pipe() failed: " + std::string(std::strerror(errno)));
    std::fflush(stdout);
    std::fflush(stderr);
    const pid_t child = fork();
    if (child < 0) throw std::runtime_error("fork() failed: " + std::string(std::strerror(errno)));
    if (child == 0) {
        close(fds[0]);
        int status = 0;
        try {
            const auto [summary, curve] = c.train(c.name, s, d, recipe_for(c, s));
            run_summary sent = summary;
            sent.epochs = s.epochs;
            if (!write_all(fds[1], &sent, sizeof sent) ||
                !write_all(fds[1], curve.data(), curve.size() * sizeof(epoch_record)))
                status = 1;
        } catch (const std::exception& e) {
            std::fprintf(stderr, "fashion_mnist: configuration %s failed: %s\n", c.name, e.what());
            status = 1;
        }
        std::fflush(stderr);
        close(fds[1]);
        _exit(status); // no destructors or atexit handlers of the parent's objects run twice
    }
    close(fds[1]);
    const std::vector<char> bytes = read_all(fds[0]);
    close(fds[0]);
    int status = 0;
    struct rusage usage {};
    if (wait4(child, &status, 0, &usage) != child)
        throw std::runtime_error("wait4() failed: " + std::string(std::strerror(errno)));
    result.peak_rss_kib = usage.ru_maxrss; // KiB on Linux
    if (WIFSIGNALED(status))
        std::fprintf(stderr, "fashion_mnist: configuration %s: the child process died of signal %d\n", c.name,
                     WTERMSIG(status));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || bytes.size() < sizeof(run_summary)) return result;
    std::memcpy(&result.summary, bytes.data(), sizeof(run_summary));
    const auto records = static_cast<std::size_t>(result.summary.epochs + 1);
    if (bytes.size() != sizeof(run_summary) + records * sizeof(epoch_record)) return result;
    result.curve.resize(records);
    std::memcpy(result.curve.data(), bytes.data() + sizeof(run_summary), records * sizeof(epoch_record));
    result.ok = true;
    return result;
}

// Output.

std::string format(const char* fmt, double a, double b = 0)
{
    char text[64];
    std::snprintf(text, sizeof text, fmt, a, b);
    return text;
}

std::string kib(std::uint64_t bytes) { return format("%.1f KiB", static_cast<double>(bytes) / 1024.0); }
std::string mib(std::uint64_t bytes) { return format("%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0)); }

// Resident memory of this process now (KiB), from /proc/self/status; 0 where unavailable.
long resident_kib()
{
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line))
        if (line.rfind("VmRSS:", 0) == 0) return std::atol(line.c_str() + 6);
    return 0;
}

// Mean training time of an epoch.
double seconds_per_epoch(const run_result& r)
{
    double seconds = 0;
    for (std::size_t e = 1; e < r.curve.size(); ++e) seconds += r.curve[e].seconds;
    return seconds / static_cast<double>(r.curve.size() - 1);
}

void print_table(const settings& s, const data_set& d, const std::vector<run_result>& runs, long parent_rss_kib)
{
    const std::vector<std::string> head{"config",          "ranks or stores (fc1, fc2, fc3)", "test acc", "test loss",
                                        "saved activations/step", "vs full", "optimizer state", "peak RSS",
                                        "time/epoch"};
    std::vector<std::vector<std::string>> rows;
    const run_result* base = nullptr;
    for (const run_result& r : runs)
        if (r.ok && r.name == "full") base = &r;
    for (const run_result& r : runs) {
        if (!r.ok) {
            rows.push_back({r.name, "failed", "", "", "", "", "", "", ""});
            continue;
        }
        const run_summary& m = r.summary;
        const epoch_record& last = r.curve.back();
        const double seconds = seconds_per_epoch(r);
        const std::string ranks = m.projected ? std::to_string(m.rank[0]) + ", " + std::to_string(m.rank[1]) + ", " +
                                                    std::to_string(m.rank[2])
                                              : compact::to_string(m.schemes[0]) + ", " + compact::to_string(m.schemes[1]) +
                                                    ", " + compact::to_string(m.schemes[2]);
        const std::uint64_t saved = saved_activation_bytes(m);
        std::string share = "-";
        if (base) {
            const std::uint64_t base_layers = saved_activation_bytes(base->summary) - base->summary.mask_bytes;
            share = format("1/%.2f (Z: 1/%.2f)", static_cast<double>(saved_activation_bytes(base->summary)) /
                                                      static_cast<double>(saved),
                           static_cast<double>(base_layers) / static_cast<double>(saved - m.mask_bytes));
        }
        rows.push_back({r.name, ranks, format("%.2f%%", 100.0 * last.test_accuracy), format("%.4f", last.test_loss),
                        kib(saved), share, mib(m.state_bytes), format("%.1f MiB", static_cast<double>(r.peak_rss_kib) / 1024.0),
                        base ? format("%.2f s (%.2fx)", seconds, seconds / seconds_per_epoch(*base))
                             : format("%.2f s", seconds)});
    }

    std::printf("\n%d epoch%s of %lld training images, batch %lld, hidden %lld, %d thread%s; test set: %lld images.\n\n",
                s.epochs, s.epochs == 1 ? "" : "s", static_cast<long long>(d.train.count),
                static_cast<long long>(s.batch), static_cast<long long>(s.hidden),
                compact::cpu::thread_count(compact::cpu::context{s.threads}),
                compact::cpu::thread_count(compact::cpu::context{s.threads}) == 1 ? "" : "s",
                static_cast<long long>(d.test.count));
    std::vector<std::size_t> width(head.size());
    for (std::size_t c = 0; c < head.size(); ++c) {
        width[c] = head[c].size();
        for (const auto& row : rows) width[c] = std::max(width[c], row[c].size());
    }
    const auto print_row = [&](const std::vector<std::string>& row) {
        for (std::size_t c = 0; c < row.size(); ++c) {
            if (s.markdown)
                std::printf("| %s ", row[c].c_str());
            else
                std::printf("%-*s  ", static_cast<int>(width[c]), row[c].c_str());
        }
        std::printf(s.markdown ? "|\n" : "\n");
    };
    print_row(head);
    if (s.markdown) {
        for (std::size_t c = 0; c < head.size(); ++c) std::printf("|---");
        std::printf("|\n");
    }
    for (const auto& row : rows) print_row(row);

    std::printf("\n");
    for (const run_result& r : runs) {
        if (!r.ok) continue;
        const run_summary& m = r.summary;
        if (!m.projected) {
            std::printf("%s%-4s saved per step: X1 %s + X2 %s + X3 %s (stores %s, %s, %s: %.3f nominal bits per value "
                        "against a budget of %g, %d allocation%s) + ReLU masks %s; lr %g, plain AdamW\n",
                        s.markdown ? "- " : "", r.name.c_str(), kib(m.saved_layer_bytes[0]).c_str(),
                        kib(m.saved_layer_bytes[1]).c_str(), kib(m.saved_layer_bytes[2]).c_str(),
                        compact::to_string(m.schemes[0]).c_str(), compact::to_string(m.schemes[1]).c_str(),
                        compact::to_string(m.schemes[2]).c_str(), nominal_bits_per_value(m), m.budget_bits, m.allocations,
                        m.allocations == 1 ? "" : "s", kib(m.mask_bytes).c_str(), m.used.lr);
            continue;
        }
        std::printf("%s%-4s saved per step: Z1 %s + Z2 %s + Z3 %s + ReLU masks %s; layer ranks n/r = %.0f, %.0f, %.0f; "
                    "lr %g, alpha %g, T %llu, moments %s%s\n",
                    s.markdown ? "- " : "", r.name.c_str(), kib(m.saved_layer_bytes[0]).c_str(),
                    kib(m.saved_layer_bytes[1]).c_str(), kib(m.saved_layer_bytes[2]).c_str(), kib(m.mask_bytes).c_str(),
                    static_cast<double>(m.in[0]) / static_cast<double>(m.rank[0]),
                    static_cast<double>(m.in[1]) / static_cast<double>(m.rank[1]),
                    static_cast<double>(m.in[2]) / static_cast<double>(m.rank[2]), m.used.lr, m.used.alpha,
                    static_cast<unsigned long long>(m.used.gap), compact::to_string(m.used.moments),
                    m.projection_bytes ? ("; P kept: " + mib(m.projection_bytes)).c_str() : "");
    }
    std::printf("\n%sSaved activations: what backward reads, per step of %lld rows: the layers' saved_bytes (Z; X itself "
                "for full; X's encoding for alam and gact) and two 1-bit ReLU masks. Optimizer state: AdamW moments of weights and biases. Peak RSS: "
                "the configuration's child process (wait4 ru_maxrss), including the %.1f MiB the program and the data "
                "set held when it was forked. Time/epoch: training only, evaluation excluded.\n",
                s.markdown ? "" : "", static_cast<long long>(s.batch), static_cast<double>(parent_rss_kib) / 1024.0);
}

void write_curves(const std::string& path, const std::vector<run_result>& runs)
{
    std::FILE* out = std::fopen(path.c_str(), "w");
    if (!out) throw std::runtime_error(path + ": cannot be written");
    std::fprintf(out, "# config\tepoch\ttrain_loss\ttrain_accuracy\ttest_loss\ttest_accuracy\tseconds\n");
    for (const run_result& r : runs) {
        if (!r.ok) continue;
        for (std::size_t e = 0; e < r.curve.size(); ++e) {
            const epoch_record& c = r.curve[e];
            std::fprintf(out, "%s\t%zu\t", r.name.c_str(), e);
            if (std::isnan(c.train_loss))
                std::fprintf(out, "NaN\tNaN\t");
            else
                std::fprintf(out, "%.5f\t%.5f\t", c.train_loss, c.train_accuracy);
            std::fprintf(out, "%.5f\t%.5f\t%.3f\n", c.test_loss, c.test_accuracy, c.seconds);
        }
        std::fprintf(out, "\n\n"); // gnuplot: one data block per configuration
    }
    if (std::fclose(out) != 0) throw std::runtime_error(path + ": write failed");
}

// Loading, with the standardisation statistics of the training set.

data_set load(const std::string& dir, const split_files& train, const split_files& test, const settings& s)
{
    data_set d;
    d.train = load_split(dir, train);
    d.test = load_split(dir, test);
    truncate(d.train, s.train_limit);
    truncate(d.test, s.test_limit);
    double sum = 0, squares = 0;
    for (std::uint8_t p : d.train.images) {
        const double v = p / 255.0;
        sum += v;
        squares += v * v;
    }
    const double n = static_cast<double>(d.train.images.size());
    const double mean = sum / n, variance = std::max(squares / n - mean * mean, 1e-12);
    d.mean = static_cast<float>(mean);
    d.inv_std = static_cast<float>(1.0 / std::sqrt(variance));
    return d;
}

// --smoke checks.

// The IDX reader must reject each corruption with a message naming the file and what was expected.
bool check_idx_reader()
{
    std::vector<unsigned char> good;
    write_big_endian(good, idx_images_magic);
    write_big_endian(good, 2);
    write_big_endian(good, image_side);
    write_big_endian(good, image_side);
    good.resize(16 + 2 * pixels, 7);
    std::vector<unsigned char> labels;
    write_big_endian(labels, idx_labels_magic);
    write_big_endian(labels, 2);
    labels.push_back(3);
    labels.push_back(12);

    struct case_t {
        const char* what;
        std::vector<unsigned char> bytes;
        bool images;
        const char* expected; // part of the error message
    };
    std::vector<case_t> cases;
    auto bad_magic = good;
    bad_magic[3] = 0x01; // 2049: a label file's magic
    cases.push_back({"label magic in an image file", bad_magic, true, "magic number 2049, expected 2051"});
    auto bad_side = good;
    bad_side[11] = 27;
    cases.push_back({"27x28 images", bad_side, true, "images are 27x28, expected 28x28"});
    auto truncated = good;
    truncated.pop_back();
    cases.push_back({"a truncated file", truncated, true, "1583 bytes, expected 1584"});
    cases.push_back({"a short header", std::vector<unsigned char>(good.begin(), good.begin() + 10), true,
                     "too short for an IDX image header"});
    cases.push_back({"label 12", labels, false, "label 12 at index 1 is not below 10"});

    bool ok = true;
    try {
        ok = parse_images(good, "good", 2).size() == static_cast<std::size_t>(2 * pixels);
    } catch (const std::exception& e) {
        std::printf("  IDX reader rejected a valid file: %s\n", e.what());
        ok = false;
    }
    for (const case_t& c : cases) {
        std::string message = "(accepted)";
        try {
            if (c.images)
                parse_images(c.bytes, "corrupt-idx", 2);
            else
                parse_labels(c.bytes, "corrupt-idx", 2);
        } catch (const std::runtime_error& e) {
            message = e.what();
        }
        const bool pass = message.find(c.expected) != std::string::npos && message.rfind("corrupt-idx: ", 0) == 0;
        std::printf("  IDX reader, %-30s %s: %s\n", c.what, pass ? "rejected" : "FAILED", message.c_str());
        ok = ok && pass;
    }
    return ok;
}

bool check_runs(const std::vector<run_result>& runs)
{
    bool ok = true;
    const run_result* base = nullptr;
    for (const run_result& r : runs) {
        if (!r.ok) {
            std::printf("  %-4s FAILED: the child process reported no result\n", r.name.c_str());
            ok = false;
            continue;
        }
        if (r.name == "full") base = &r;
        const double before = r.curve.front().test_loss, after = r.curve.back().test_loss;
        const bool falls = after < before;
        std::printf("  %-4s test loss %.4f -> %.4f: %s\n", r.name.c_str(), before, after, falls ? "falls" : "FAILED to fall");
        ok = ok && falls;
    }
    // A store keeps exactly what its scheme stores for a full batch, and the allocation fits its budget.
    for (const run_result& r : runs) {
        if (!r.ok || r.summary.projected) continue;
        const run_summary& m = r.summary;
        for (std::size_t l = 0; l < m.schemes.size(); ++l) {
            const index_t count = m.rows * m.in[l];
            const std::size_t expected = compact::stored_bytes<float>(m.schemes[l], count);
            const bool exact = m.saved_layer_bytes[l] == expected;
            std::printf("  %-4s fc%zu store %s keeps %llu bytes for %lld values: %s\n", r.name.c_str(), l + 1,
                        compact::to_string(m.schemes[l]).c_str(), static_cast<unsigned long long>(m.saved_layer_bytes[l]),
                        static_cast<long long>(count), exact ? "as its scheme stores" : "MISMATCH");
            ok = ok && exact;
        }
        const double bits = nominal_bits_per_value(m);
        const bool within = m.allocations >= 1 && bits <= m.budget_bits;
        std::printf("  %-4s %d allocation%s, %.3f nominal bits per value against a budget of %g: %s\n", r.name.c_str(),
                    m.allocations, m.allocations == 1 ? "" : "s", bits, m.budget_bits,
                    within ? "within" : "FAILED");
        ok = ok && within;
    }
    if (!base) return ok;
    for (const run_result& r : runs) {
        if (!r.ok || !r.summary.projected) continue;
        for (int l = 0; l < layer_count; ++l) {
            const auto i = static_cast<std::size_t>(l);
            // saved_full / saved = n / r exactly: saved_full * r == saved * n.
            const std::uint64_t full = base->summary.saved_layer_bytes[i], saved = r.summary.saved_layer_bytes[i];
            const auto n = static_cast<std::uint64_t>(r.summary.in[i]), rank = static_cast<std::uint64_t>(r.summary.rank[i]);
            const bool exact = full * rank == saved * n;
            std::printf("  %-4s fc%d saved %llu bytes vs %llu uncompressed: ratio n/r = %llu/%llu %s\n", r.name.c_str(),
                        l + 1, static_cast<unsigned long long>(saved), static_cast<unsigned long long>(full),
                        static_cast<unsigned long long>(n), static_cast<unsigned long long>(rank),
                        exact ? "exactly" : "MISMATCH");
            ok = ok && exact;
        }
    }
    return ok;
}

// A fresh directory under $TMPDIR (or /tmp); removed by the caller.
std::string make_temp_dir()
{
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/fashion_mnist.XXXXXX";
    std::vector<char> name(pattern.begin(), pattern.end());
    name.push_back('\0');
    if (!mkdtemp(name.data())) throw std::runtime_error(pattern + ": mkdtemp failed: " + std::strerror(errno));
    return name.data();
}

int usage(const char* program, const std::string& problem)
{
    if (!problem.empty()) std::fprintf(stderr, "%s: %s\n", program, problem.c_str());
    std::fprintf(stderr,
                 "usage: %s [--epochs E] [--batch N] [--threads T] [--train-limit K] [--test-limit K]\n"
                 "       [--configs full,n/2,n/4,n/8] [--lr X] [--alpha A] [--gap T] [--moments keep|reset|transfer]\n"
                 "       [--keep-projection] [--constant-lr] [--hidden H] [--seed S] [--data DIR] [--curves FILE]\n"
                 "       [--markdown] [--smoke]\n",
                 program);
    return 2;
}

std::vector<std::string> split_list(const std::string& text)
{
    std::vector<std::string> out;
    std::size_t start = 0;
    while (start <= text.size()) {
        const std::size_t comma = std::min(text.find(',', start), text.size());
        if (comma > start) out.push_back(text.substr(start, comma - start));
        start = comma + 1;
    }
    return out;
}

// Parses a number, or returns false.
template <class T>
bool parse_number(const char* text, T& out)
{
    char* end = nullptr;
    errno = 0;
    if constexpr (std::is_floating_point_v<T>) {
        const double v = std::strtod(text, &end);
        out = static_cast<T>(v);
    } else {
        const long long v = std::strtoll(text, &end, 10);
        if (v < 0) return false;
        out = static_cast<T>(v);
    }
    return errno == 0 && end != text && *end == '\0';
}

} // namespace

int main(int argc, char** argv)
{
    settings s;
    bool threads_given = false, epochs_given = false, batch_given = false, hidden_given = false;
    bool train_limit_given = false, test_limit_given = false;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
        const auto number = [&](auto& out) {
            if (!value || !parse_number(value, out)) return false;
            ++i;
            return true;
        };
        bool good = true;
        if (arg == "--smoke") {
            s.smoke = true;
        } else if (arg == "--keep-projection") {
            s.keep_projection = true;
        } else if (arg == "--constant-lr") {
            s.cosine = false;
        } else if (arg == "--markdown") {
            s.markdown = true;
        } else if (arg == "--epochs") {
            good = number(s.epochs) && s.epochs >= 1;
            epochs_given = true;
        } else if (arg == "--batch") {
            good = number(s.batch) && s.batch >= 1;
            batch_given = true;
        } else if (arg == "--hidden") {
            good = number(s.hidden) && s.hidden >= 8;
            hidden_given = true;
        } else if (arg == "--threads") {
            good = number(s.threads);
            threads_given = true;
        } else if (arg == "--train-limit") {
            good = number(s.train_limit) && s.train_limit >= 1;
            train_limit_given = true;
        } else if (arg == "--test-limit") {
            good = number(s.test_limit) && s.test_limit >= 1;
            test_limit_given = true;
        } else if (arg == "--seed") {
            good = number(s.seed);
        } else if (arg == "--lr") {
            double v = 0;
            good = number(v) && v > 0;
            s.lr = v;
        } else if (arg == "--alpha") {
            double v = 0;
            good = number(v) && v > 0;
            s.alpha = v;
        } else if (arg == "--gap") {
            std::uint64_t v = 0;
            good = number(v);
            s.gap = v;
        } else if (arg == "--moments" && value) {
            const std::string m = argv[++i];
            if (m == "keep") s.moments = compact::moment_policy::keep;
            else if (m == "reset") s.moments = compact::moment_policy::reset;
            else if (m == "transfer") s.moments = compact::moment_policy::transfer;
            else good = false;
        } else if (arg == "--configs" && value) {
            s.configs = split_list(argv[++i]);
        } else if (arg == "--data" && value) {
            s.data_dir = argv[++i];
        } else if (arg == "--curves" && value) {
            s.curves = argv[++i];
        } else {
            return usage(argv[0], "unknown or incomplete argument " + arg);
        }
        if (!good) return usage(argv[0], "bad value for " + arg);
    }
    for (const std::string& name : s.configs) {
        const auto& all = configurations();
        if (std::none_of(all.begin(), all.end(), [&](const configuration& c) { return name == c.name; }))
            return usage(argv[0], "unknown configuration '" + name + "' in --configs (known: full, n/2, n/4, n/8, alam, gact)");
    }
    // The smoke run: one short epoch on a slice, on one thread (CI runs tests side by side).
    if (s.smoke) {
        if (!threads_given) s.threads = 1;
        if (!epochs_given) s.epochs = 1;
        if (!batch_given) s.batch = 64;
        if (!hidden_given) s.hidden = 256;
        if (!train_limit_given) s.train_limit = 512;
        if (!test_limit_given) s.test_limit = 256;
    }

    std::string temp_dir;
    int rc = 0;
    try {
        bool ok = true;
        if (s.smoke) {
            std::printf("smoke: checking the IDX reader on corrupt headers\n");
            ok = check_idx_reader();
        }
        split_files train = train_split, test = test_split;
        std::string dir = s.data_dir;
        const bool present = file_exists(dir + "/" + train.images + ".gz") || file_exists(dir + "/" + train.images);
        if (s.smoke && !present) {
            temp_dir = make_temp_dir();
            dir = temp_dir;
            train.count = s.train_limit;
            test.count = s.test_limit;
            std::printf("smoke: no Fashion-MNIST in %s; training on generated IDX files in %s (%lld + %lld images)\n",
                        s.data_dir.c_str(), dir.c_str(), static_cast<long long>(train.count),
                        static_cast<long long>(test.count));
            write_generated_split(dir, train, 1);
            write_generated_split(dir, test, 2);
        }
        const data_set d = load(dir, train, test, s);
        std::printf("Fashion-MNIST MLP 784-%lld-%lld-10 from %s: %lld training and %lld test images\n",
                    static_cast<long long>(s.hidden), static_cast<long long>(s.hidden), dir.c_str(),
                    static_cast<long long>(d.train.count), static_cast<long long>(d.test.count));
        std::fflush(stdout);

        const long parent_rss = resident_kib();
        std::vector<run_result> runs;
        for (const configuration& c : configurations()) {
            if (!s.configs.empty() && std::find(s.configs.begin(), s.configs.end(), c.name) == s.configs.end()) continue;
            runs.push_back(run_configuration(c, s, d));
        }
        print_table(s, d, runs, parent_rss);
        if (!s.curves.empty()) write_curves(s.curves, runs);
        for (const run_result& r : runs) ok = ok && r.ok;
        if (s.smoke) {
            std::printf("\nsmoke checks:\n");
            ok = check_runs(runs) && ok;
            std::printf("smoke: %s\n", ok ? "all checks passed" : "FAILED");
        }
        rc = ok ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
        rc = 1;
    }
    if (!temp_dir.empty()) {
        for (const char* name : {train_split.images, train_split.labels, test_split.images, test_split.labels})
            std::remove((temp_dir + "/" + name + ".gz").c_str());
        rmdir(temp_dir.c_str());
    }
    return rc;
}
