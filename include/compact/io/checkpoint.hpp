// compact/io/checkpoint.hpp: a versioned, checksummed file of named, typed sections, written atomically.
//
// A checkpoint is a flat list of sections. Each has a unique name ("layers/0/weight"), a scalar type
// (dtype), a shape (0 to 8 extents; rank 0 is a single value) and its values, row-major. What a
// component saves is its own business (see io/linear_layer_checkpoint.hpp); the container only
// guarantees that what was written is what is read, or an error says why not. New kinds of state (the
// quantizer's bit allocation, say) are new sections: the container format does not change for them.
//
//   checkpoint_writer w;                               // collects sections in memory
//   w.add("embedding", compact::const_matrix_view<float>(e, vocab, d));   // (vocab, d)
//   w.add_scalar<std::uint64_t>("step", step);
//   w.write("run.ckpt");                               // run.ckpt.tmp.<hash>, fsync, rename over run.ckpt
//
//   auto r = checkpoint_reader::read_file("run.ckpt"); // the whole file, validated
//   r.read("embedding", compact::matrix_view<float>(e, vocab, d));        // dtype and shape checked
//   step = r.scalar<std::uint64_t>("step");
//
// r.expect<T>(name, shape) checks a section's dtype and shape without copying, so that a caller can
// validate everything it will load before it changes anything.
//
// Byte layout, format version 1. Integers are little-endian (big-endian hosts are rejected at compile
// time); offsets in bytes; every section starts at a multiple of 8 from the start of the file.
//
//   header, 40 bytes
//     0   8  magic           89 43 4B 50 0D 0A 1A 0A   ("\x89CKP\r\n\x1a\n", after PNG: the high byte
//                                                       catches 7-bit channels, CR LF / LF catch newline
//                                                       conversion)
//     8   4  u32 version     checkpoint_format_version; a reader rejects versions newer than its own
//    12   4  u32 reserved    0
//    16   8  u64 sections    how many sections follow
//    24   8  u64 file bytes  the size of the whole file, header included (detects truncation)
//    32   8  u64 checksum    CRC-64 of bytes [0, 32)
//   section, repeated; L = name bytes, d = rank, P = payload bytes, pad(x) = x rounded up to 8
//     0   8  u64 P           = element count * dtype size (element count 1 for rank 0)
//     8   2  u16 L           1 .. 255; printable ASCII (0x20 .. 0x7e)
//    10   1  u8  dtype       dtype code (below)
//    11   1  u8  d           0 .. 8
//    12   4  u32 reserved    0
//    16  8d  u64 extents[d]
//    16 + 8d              name, then zeros up to pad(L)
//    H = 16 + 8d + pad(L) payload, values row-major, little-endian, then zeros up to pad(P)
//    H + pad(P)        8  u64 checksum: CRC-64 of the section's bytes [0, H + pad(P))
//   the file ends right after the last section.
//
// dtype codes: 1 u8, 2 i8, 3 u16, 4 i16, 5 u32, 6 i32, 7 u64, 8 i64, 9 f32 (IEEE binary32),
// 10 f64 (binary64). Codes are never reused; new types get new codes.
//
// Checksum: CRC-64/XZ (ECMA-182 polynomial 0x42F0E1EBA9EA3693, reflected as 0xC96C5795D7870F42,
// initial value and final xor all ones; crc64("123456789") = 0x995DC9BBDF1939FA), slicing-by-8: about
// 2 GB/s on one x86 core. It finds every burst error of up to 64 bits.
//
// Versioning: the format version changes only when this container layout changes; a reader reads
// every version up to its own. Adding sections never changes it: readers look sections up by name and
// ignore the ones they do not know.
//
// Guarantees and errors. write() puts the bytes in a temporary file next to the target, fsyncs it,
// renames it over the target and fsyncs the directory, so a crash at any point leaves either the old or
// the new checkpoint, never a mix. read_file() and the reader's constructor validate the whole file before
// they return: magic, version, header checksum, size, and for every section its layout and checksum.
// read_file() reads only regular files, and checks the 40-byte header (magic, version, checksum, and the
// declared size against the file's) before it reads or allocates anything more: a device, a pipe or a
// large file that is not a checkpoint is refused at once, and it never reads more than the header declares.
//
// Temporary files. The temporary file of a target has one name, fixed by the target's file name F:
//   F ".tmp." H    in the target's directory, H = CRC-64 (above) of the bytes of F, as 16 lowercase hex digits
// with F cut short (at a UTF-8 character boundary) when the whole would exceed the directory's NAME_MAX,
// so any file name the file system accepts can be written ("run.ckpt" -> "run.ckpt.tmp.<16 hex>").
// A writer killed mid-write (SIGKILL, power loss) leaves that one file behind; the next write() to the same
// target takes it over (truncates, rewrites and renames it), so stale temporaries never accumulate: at most
// one per target, gone after the next successful write. Writers of the same target serialise on an
// exclusive flock() of the temporary file (a second writer waits for the first to rename it, then writes
// its own), so concurrent writers, threads or processes, still leave one whole checkpoint, the last one
// renamed. A temporary that is not a regular file owned by the writing user with a single link (a symbolic
// link or a file planted by someone else) is never written through: write() refuses it, naming it.
// Each failure is a compact::error naming the file (or "<memory>"), the section where there is one, and
// the class of the problem in words callers can match: "not a compact checkpoint", "newer format
// version", "truncated", "checksum mismatch", "corrupt" (a layout no writer produces), "missing
// section", "dtype mismatch", "shape mismatch".
//
// Cost: the writer holds a copy of every section until it is destroyed; the reader holds the whole
// file. Both checksum every byte once.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"

#include <array>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_WIN32)
#error "compact/io/checkpoint.hpp needs POSIX file calls (open, fsync, rename); it supports Linux and other Unixes"
#endif
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "compact/io/checkpoint.hpp writes little-endian files by copying memory: big-endian hosts are not "
              "supported");
#endif

COMPACT_NAMESPACE_BEGIN

/// The container layout this build writes, and the newest it reads.
inline constexpr std::uint32_t checkpoint_format_version = 1;

/// Scalar type of a section; the values are the codes stored in the file.
enum class dtype : std::uint8_t { u8 = 1, i8, u16, i16, u32, i32, u64, i64, f32, f64 };

inline const char* to_string(dtype t) noexcept
{
    switch (t) {
    case dtype::u8: return "u8";
    case dtype::i8: return "i8";
    case dtype::u16: return "u16";
    case dtype::i16: return "i16";
    case dtype::u32: return "u32";
    case dtype::i32: return "i32";
    case dtype::u64: return "u64";
    case dtype::i64: return "i64";
    case dtype::f32: return "f32";
    case dtype::f64: return "f64";
    }
    return "unknown";
}

/// Bytes of one value of `t` (0 for a code this build does not know).
inline std::size_t dtype_size(dtype t) noexcept
{
    switch (t) {
    case dtype::u8:
    case dtype::i8: return 1;
    case dtype::u16:
    case dtype::i16: return 2;
    case dtype::u32:
    case dtype::i32:
    case dtype::f32: return 4;
    case dtype::u64:
    case dtype::i64:
    case dtype::f64: return 8;
    }
    return 0;
}

/// True for the C++ types a section can hold: integers of 1, 2, 4 or 8 bytes (not bool or char),
/// and IEEE float and double.
template <class T>
inline constexpr bool is_checkpoint_type =
    (std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char> &&
     (sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8)) ||
    ((std::is_same_v<T, float> || std::is_same_v<T, double>) && std::numeric_limits<T>::is_iec559);

/// The dtype of a C++ type (see is_checkpoint_type).
template <class T>
constexpr dtype dtype_of() noexcept
{
    static_assert(is_checkpoint_type<T>, "compact: a checkpoint section holds integers of 1, 2, 4 or 8 bytes, "
                                         "float or double");
    if constexpr (std::is_floating_point_v<T>) {
        return sizeof(T) == 4 ? dtype::f32 : dtype::f64;
    } else {
        constexpr bool s = std::is_signed_v<T>;
        switch (sizeof(T)) {
        case 1: return s ? dtype::i8 : dtype::u8;
        case 2: return s ? dtype::i16 : dtype::u16;
        case 4: return s ? dtype::i32 : dtype::u32;
        default: return s ? dtype::i64 : dtype::u64;
        }
    }
}

namespace detail {

// ------------------------------------------------------------------------------------------ CRC-64

inline constexpr std::uint64_t crc64_polynomial = 0xC96C5795D7870F42ull; // ECMA-182, reflected

using crc64_tables = std::array<std::array<std::uint64_t, 256>, 8>;

/// tables[0] is the bytewise table; tables[k][b] advances tables[k-1][b] by one more zero byte.
constexpr crc64_tables make_crc64_tables() noexcept
{
    crc64_tables t{};
    for (std::uint32_t b = 0; b < 256; ++b) {
        std::uint64_t c = b;
        for (int bit = 0; bit < 8; ++bit) c = (c & 1) ? (c >> 1) ^ crc64_polynomial : c >> 1;
        t[0][b] = c;
    }
    for (std::size_t k = 1; k < 8; ++k)
        for (std::size_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xff];
    return t;
}

inline constexpr crc64_tables crc64_table = make_crc64_tables();

} // namespace detail

/// Continues a CRC-64/XZ over `bytes` bytes at `data`; start with crc = 0. crc64(crc64(0, a), b) is
/// the checksum of a followed by b.
inline std::uint64_t crc64(std::uint64_t crc, const void* data, std::size_t bytes) noexcept
{
    const auto& t = detail::crc64_table;
    const auto* p = static_cast<const unsigned char*>(data);
    std::uint64_t c = ~crc;
    for (; bytes >= 8; bytes -= 8, p += 8) {
        std::uint64_t word;
        std::memcpy(&word, p, 8); // little-endian: the first byte is the low byte
        c ^= word;
        c = t[7][c & 0xff] ^ t[6][(c >> 8) & 0xff] ^ t[5][(c >> 16) & 0xff] ^ t[4][(c >> 24) & 0xff] ^
            t[3][(c >> 32) & 0xff] ^ t[2][(c >> 40) & 0xff] ^ t[1][(c >> 48) & 0xff] ^ t[0][c >> 56];
    }
    for (; bytes > 0; --bytes, ++p) c = t[0][(c ^ *p) & 0xff] ^ (c >> 8);
    return ~c;
}

namespace detail {

inline constexpr unsigned char checkpoint_magic[8] = {0x89, 'C', 'K', 'P', '\r', '\n', 0x1a, '\n'};
inline constexpr std::size_t checkpoint_header_bytes = 40;
inline constexpr std::size_t checkpoint_max_name = 255;
inline constexpr std::size_t checkpoint_max_rank = 8;

constexpr std::uint64_t pad8(std::uint64_t bytes) noexcept { return (bytes + 7) / 8 * 8; }

template <class T>
void put(std::vector<unsigned char>& out, T value)
{
    const std::size_t at = out.size();
    out.resize(at + sizeof(T));
    std::memcpy(out.data() + at, &value, sizeof(T));
}

template <class T>
T get(const unsigned char* p) noexcept
{
    T value;
    std::memcpy(&value, p, sizeof(T));
    return value;
}

inline bool printable_name(std::string_view name) noexcept
{
    for (char ch : name)
        if (ch < 0x20 || ch > 0x7e) return false;
    return !name.empty() && name.size() <= checkpoint_max_name;
}

/// "(a, b)" for a shape; "()" for a scalar.
inline std::string extents_string(const std::vector<std::uint64_t>& shape)
{
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + ")";
}

inline std::string hex64(std::uint64_t v)
{
    std::string s = "0x0000000000000000";
    for (int i = 17; v != 0; --i, v >>= 4) s[static_cast<std::size_t>(i)] = "0123456789abcdef"[v & 0xf];
    return s;
}

inline std::string errno_text(int code) { return std::generic_category().message(code); }

/// The temporary file name of the target file name `name` in a directory whose names hold at most
/// `name_max` bytes: name ".tmp." and the CRC-64 of name in 16 hex digits, the name cut short to fit.
inline std::string checkpoint_temporary_name(const std::string& name, std::size_t name_max)
{
    const std::string suffix = ".tmp." + hex64(crc64(0, name.data(), name.size())).substr(2);
    std::size_t keep = name.size();
    if (keep + suffix.size() > name_max) {
        keep = name_max > suffix.size() ? name_max - suffix.size() : 0;
        while (keep > 0 && (static_cast<unsigned char>(name[keep]) & 0xc0) == 0x80) --keep; // not mid-character
    }
    return name.substr(0, keep) + suffix;
}

/// "a directory", "a character device", ...: what a stat mode is, for messages.
inline const char* file_kind(mode_t mode) noexcept
{
    if (S_ISREG(mode)) return "a regular file";
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISFIFO(mode)) return "a pipe (FIFO)";
    if (S_ISSOCK(mode)) return "a socket";
    if (S_ISLNK(mode)) return "a symbolic link";
    return "not a regular file";
}

} // namespace detail

/// One validated section of a checkpoint_reader: where its values lie in the reader's bytes.
struct checkpoint_section {
    std::string name;
    dtype type = dtype::u8;
    std::vector<std::uint64_t> shape; ///< empty for a scalar
    std::uint64_t count = 0;          ///< number of values: the product of shape
    std::uint64_t offset = 0;         ///< of the first value, in bytes from the start of the file
    std::uint64_t bytes = 0;          ///< count * dtype_size(type)
};

// ================================================================================================ writer

/// Collects named sections in memory, then writes them as one checkpoint file.
/// Names must be unique, 1 to 255 printable ASCII characters; use "/" to make a hierarchy.
class checkpoint_writer {
public:
    /// A section of `shape` holding count = product(shape) values of T, copied from `data`.
    template <class T>
    void add(std::string_view name, const T* data, const std::vector<std::uint64_t>& shape)
    {
        constexpr const char* where = "checkpoint_writer::add";
        const std::uint64_t count = element_count(name, shape, sizeof(T), where);
        COMPACT_REQUIRE(count == 0 || data != nullptr, where, "section '", name, "': data is null but the shape ",
                        detail::extents_string(shape), " holds ", count, " values");
        auto out = begin_section(name, dtype_of<T>(), shape, count * sizeof(T), where);
        const std::size_t at = out.size();
        out.resize(at + static_cast<std::size_t>(count * sizeof(T)));
        if (count) std::memcpy(out.data() + at, data, static_cast<std::size_t>(count * sizeof(T)));
        end_section(name, std::move(out));
    }

    /// A (rows, cols) section with the values of `v` (any leading dimension).
    template <class T>
    void add(std::string_view name, const_matrix_view<T> v)
    {
        constexpr const char* where = "checkpoint_writer::add";
        detail::check_view(v, where, "the view");
        const std::vector<std::uint64_t> shape{static_cast<std::uint64_t>(v.rows), static_cast<std::uint64_t>(v.cols)};
        const std::uint64_t count = element_count(name, shape, sizeof(T), where);
        auto out = begin_section(name, dtype_of<T>(), shape, count * sizeof(T), where);
        const std::size_t row_bytes = static_cast<std::size_t>(v.cols) * sizeof(T);
        for (index_t i = 0; i < v.rows && row_bytes > 0; ++i) {
            const std::size_t at = out.size();
            out.resize(at + row_bytes);
            std::memcpy(out.data() + at, v.row(i), row_bytes);
        }
        end_section(name, std::move(out));
    }
    template <class T>
    void add(std::string_view name, matrix_view<T> v)
    {
        add(name, const_matrix_view<T>(v));
    }

    /// A rank-0 section holding one value.
    template <class T>
    void add_scalar(std::string_view name, T value)
    {
        add(name, &value, {});
    }

    bool contains(std::string_view name) const { return names_.find(name) != names_.end(); }
    std::size_t section_count() const noexcept { return sections_.size(); }

    /// Size of the file write() produces.
    std::uint64_t file_bytes() const noexcept
    {
        std::uint64_t total = detail::checkpoint_header_bytes;
        for (const auto& s : sections_) total += s.size();
        return total;
    }

    /// The file's bytes, for tests and for callers that store checkpoints elsewhere.
    std::vector<unsigned char> bytes() const
    {
        std::vector<unsigned char> out = header();
        out.reserve(static_cast<std::size_t>(file_bytes()));
        for (const auto& s : sections_) out.insert(out.end(), s.begin(), s.end());
        return out;
    }

    /// Writes the checkpoint to `path` atomically: the bytes go to the target's temporary file
    /// `path`.tmp.<hash> in the same directory (see "Temporary files" at the top of this header), which is
    /// locked, truncated, written, fsync'ed and renamed over `path`; the directory is then fsync'ed so the
    /// rename survives a crash too. On any failure the temporary file is removed, `path` is left as it
    /// was, and a compact::error carries the system's reason. A process killed mid-write may leave the
    /// temporary file behind (never a partial `path`); the next write to `path` reuses it. While another
    /// writer of `path` holds the temporary file, write() waits for it. The new file gets the permissions
    /// a newly created file gets (0666 less the umask; a reused stale temporary keeps those it was created
    /// with), and a symbolic link at `path` is replaced, not followed.
    void write(const std::string& path) const
    {
        constexpr const char* where = "checkpoint_writer::write";
        COMPACT_REQUIRE(!path.empty(), where, "empty path");
        const std::string::size_type slash = path.find_last_of('/');
        const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
        const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
        COMPACT_REQUIRE(!name.empty(), where, "'", path, "': the path ends in '/', it names no file");
        const long name_max = ::pathconf(dir.c_str(), _PC_NAME_MAX);
        const std::string tmp = path.substr(0, path.size() - name.size()) +
                                detail::checkpoint_temporary_name(name, name_max > 0 ? std::size_t(name_max) : 255);

        int fd = -1;
        auto refuse = [&](const char* what, const std::string& why) {
            if (fd >= 0) ::close(fd);
            COMPACT_FAIL(where, "'", path, "': ", what, " the temporary file '", tmp, "': ", why);
        };
        // Lock the file that is at `tmp` when the lock is granted: a writer that held it before us has
        // renamed it over the target (or removed it) by then, and its inode is no longer ours to write.
        for (;;) {
            do {
                fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0666);
            } while (fd < 0 && errno == EINTR);
            if (fd < 0) refuse("cannot create", detail::errno_text(errno));
            int locked;
            do {
                locked = ::flock(fd, LOCK_EX);
            } while (locked != 0 && errno == EINTR);
            if (locked != 0) refuse("cannot lock", detail::errno_text(errno));
            struct ::stat held {}, named {};
            if (::fstat(fd, &held) != 0) refuse("cannot stat", detail::errno_text(errno));
            if (::lstat(tmp.c_str(), &named) == 0) {
                if (named.st_dev == held.st_dev && named.st_ino == held.st_ino) {
                    if (!S_ISREG(held.st_mode) || held.st_nlink != 1 || held.st_uid != ::geteuid())
                        refuse("refusing to write through",
                               detail::concat("it is ", detail::file_kind(held.st_mode), " with ", held.st_nlink,
                                              " links owned by user ", held.st_uid, ", not a regular file of user ",
                                              ::geteuid(), " with one link; remove it"));
                    break;
                }
            } else if (errno != ENOENT) {
                refuse("cannot stat", detail::errno_text(errno));
            }
            ::close(fd);
            fd = -1;
        }

        auto fail = [&](const char* what, int code) {
            ::unlink(tmp.c_str()); // while the lock is held: no other writer is using this name
            if (fd >= 0) ::close(fd);
            COMPACT_FAIL(where, "'", path, "': ", what, " failed (temporary file '", tmp,
                         "'): ", detail::errno_text(code), "; the previous checkpoint, if any, is unchanged");
        };
        // A stale temporary left by a killed writer may hold anything: start from an empty file.
        if (::ftruncate(fd, 0) != 0) fail("truncating", errno);
        const std::vector<unsigned char> head = header();
        if (int code = write_all(fd, head.data(), head.size())) fail("writing", code);
        for (const auto& s : sections_)
            if (int code = write_all(fd, s.data(), s.size())) fail("writing", code);
        if (::fsync(fd) != 0) fail("fsync", errno);
        // The lock is held through the rename (closing would release it to a waiting writer, which would
        // truncate the file we are about to rename); after a successful fsync, close cannot lose data.
        if (::rename(tmp.c_str(), path.c_str()) != 0) fail("renaming the temporary file over the checkpoint", errno);
        ::close(fd);
        fd = -1;

        int dir_fd;
        do {
            dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        } while (dir_fd < 0 && errno == EINTR);
        // Some file systems cannot fsync a directory (EINVAL); the rename is then as durable as they allow.
        if (dir_fd >= 0) {
            const int synced = ::fsync(dir_fd) == 0 ? 0 : errno;
            ::close(dir_fd);
            COMPACT_REQUIRE(synced == 0 || synced == EINVAL, where, "'", path,
                            "': written and renamed, but fsync of its directory failed: ", detail::errno_text(synced));
        }
    }

private:
    static std::uint64_t element_count(std::string_view name, const std::vector<std::uint64_t>& shape,
                                       std::size_t size, const char* where)
    {
        COMPACT_REQUIRE(detail::printable_name(name), where, "section name '", name,
                        "' must be 1 to 255 printable ASCII characters");
        COMPACT_REQUIRE(shape.size() <= detail::checkpoint_max_rank, where, "section '", name, "' has ", shape.size(),
                        " extents; at most ", detail::checkpoint_max_rank, " are allowed");
        std::uint64_t count = 1;
        for (std::uint64_t e : shape) {
            COMPACT_REQUIRE(e == 0 || count <= std::numeric_limits<std::uint64_t>::max() / size / e, where, "section '",
                            name, "': shape ", detail::extents_string(shape), " is too large");
            count *= e;
        }
        return count;
    }

    /// The section's bytes up to its payload; the caller appends the payload and calls end_section.
    std::vector<unsigned char> begin_section(std::string_view name, dtype type, const std::vector<std::uint64_t>& shape,
                                             std::uint64_t payload, const char* where) const
    {
        COMPACT_REQUIRE(!contains(name), where, "section '", name, "' was added twice");
        std::vector<unsigned char> out;
        out.reserve(static_cast<std::size_t>(16 + 8 * shape.size() + detail::pad8(name.size()) +
                                             detail::pad8(payload) + 8));
        detail::put<std::uint64_t>(out, payload);
        detail::put<std::uint16_t>(out, static_cast<std::uint16_t>(name.size()));
        detail::put<std::uint8_t>(out, static_cast<std::uint8_t>(type));
        detail::put<std::uint8_t>(out, static_cast<std::uint8_t>(shape.size()));
        detail::put<std::uint32_t>(out, 0);
        for (std::uint64_t e : shape) detail::put<std::uint64_t>(out, e);
        out.insert(out.end(), name.begin(), name.end());
        out.resize(static_cast<std::size_t>(detail::pad8(out.size())), 0);
        return out;
    }

    void end_section(std::string_view name, std::vector<unsigned char> out)
    {
        out.resize(static_cast<std::size_t>(detail::pad8(out.size())), 0);
        detail::put<std::uint64_t>(out, crc64(0, out.data(), out.size()));
        names_.emplace(name);
        sections_.push_back(std::move(out));
    }

    std::vector<unsigned char> header() const
    {
        std::vector<unsigned char> h(std::begin(detail::checkpoint_magic), std::end(detail::checkpoint_magic));
        detail::put<std::uint32_t>(h, checkpoint_format_version);
        detail::put<std::uint32_t>(h, 0);
        detail::put<std::uint64_t>(h, sections_.size());
        detail::put<std::uint64_t>(h, file_bytes());
        detail::put<std::uint64_t>(h, crc64(0, h.data(), h.size()));
        return h;
    }

    /// 0, or the errno of the failure.
    static int write_all(int fd, const unsigned char* data, std::size_t bytes)
    {
        while (bytes > 0) {
            const ::ssize_t n = ::write(fd, data, bytes);
            if (n < 0) {
                if (errno == EINTR) continue;
                return errno;
            }
            data += n;
            bytes -= static_cast<std::size_t>(n);
        }
        return 0;
    }

    std::vector<std::vector<unsigned char>> sections_; // each: descriptor, name, payload, checksum
    std::set<std::string, std::less<>> names_;
};

// ================================================================================================ reader

/// A whole checkpoint in memory, validated on construction; typed, checked access to its sections.
class checkpoint_reader {
public:
    /// Reads and validates the file at `path` (see the errors at the top of this header). Only a regular
    /// file is read (a directory, device, pipe or socket is refused before any read), its header is checked
    /// before anything more is read or allocated, and it must have exactly the size its header declares.
    static checkpoint_reader read_file(const std::string& path)
    {
        constexpr const char* where = "checkpoint_reader::read_file";
        int fd;
        // O_NONBLOCK: opening a FIFO must not wait for a writer to appear; it is refused just below.
        do {
            fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        } while (fd < 0 && errno == EINTR);
        COMPACT_REQUIRE(fd >= 0, where, "'", path, "': cannot open: ", detail::errno_text(errno));
        struct closer {
            int fd;
            ~closer() { ::close(fd); }
        } const closing{fd};
        struct ::stat info {};
        if (::fstat(fd, &info) != 0) COMPACT_FAIL(where, "'", path, "': cannot read: ", detail::errno_text(errno));
        COMPACT_REQUIRE(S_ISREG(info.st_mode), where, "'", path, "': cannot read: it is ",
                        detail::file_kind(info.st_mode), ", not a regular file (a checkpoint is read only from a regular file of the size its "
                        "header declares)");
        const int flags = ::fcntl(fd, F_GETFL);
        if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);

        unsigned char head[detail::checkpoint_header_bytes];
        std::size_t got = 0;
        if (int code = read_all(fd, head, sizeof head, got))
            COMPACT_FAIL(where, "'", path, "': cannot read: ", detail::errno_text(code));
        const header_fields h = check_header(head, got, path);
        const auto size = static_cast<std::uint64_t>(info.st_size);
        if (size < h.declared)
            fail_in(path, "truncated: the file has ", size, " bytes but its header declares ", h.declared);
        if (size > h.declared)
            fail_in(path, "corrupt: the file has ", size, " bytes but its header declares ", h.declared,
                    " (trailing bytes after the last section)");
        COMPACT_REQUIRE(h.declared <= std::numeric_limits<std::size_t>::max(), where, "'", path, "': ", h.declared,
                        " bytes do not fit in this process's address space");

        std::vector<unsigned char> bytes(static_cast<std::size_t>(h.declared));
        std::memcpy(bytes.data(), head, got);
        std::size_t rest = 0;
        if (int code = read_all(fd, bytes.data() + got, bytes.size() - got, rest))
            COMPACT_FAIL(where, "'", path, "': cannot read: ", detail::errno_text(code));
        if (got + rest < bytes.size())
            fail_in(path, "truncated: the file has ", got + rest, " bytes but its header declares ", h.declared,
                    " (it shrank while being read)");
        unsigned char more = 0;
        std::size_t extra = 0;
        if (int code = read_all(fd, &more, 1, extra))
            COMPACT_FAIL(where, "'", path, "': cannot read: ", detail::errno_text(code));
        if (extra != 0)
            fail_in(path, "corrupt: the file has more bytes than its header declares, ", h.declared,
                    " (it grew while being read)");
        return checkpoint_reader(std::move(bytes), path);
    }

    /// Validates `bytes`, a whole checkpoint; `source` names it in error messages.
    explicit checkpoint_reader(std::vector<unsigned char> bytes, std::string source = "<memory>")
        : bytes_(std::move(bytes)), source_(std::move(source))
    {
        parse();
    }

    const std::string& source() const noexcept { return source_; }
    std::uint32_t version() const noexcept { return version_; }
    const std::vector<checkpoint_section>& sections() const noexcept { return sections_; }
    /// The file's bytes (a section's values start at bytes().data() + section.offset).
    const std::vector<unsigned char>& bytes() const noexcept { return bytes_; }

    bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }

    /// The section called `name`; "missing section" if there is none.
    const checkpoint_section& find(std::string_view name) const
    {
        const auto it = index_.find(name);
        if (it == index_.end()) fail("missing section '", name, "'");
        return sections_[it->second];
    }

    /// The section called `name`, checked to hold T values in exactly `shape` ({} for a scalar): raises
    /// "missing section", "dtype mismatch" or "shape mismatch". Touches nothing but the reader.
    template <class T>
    const checkpoint_section& expect(std::string_view name, const std::vector<std::uint64_t>& shape) const
    {
        const checkpoint_section& s = find(name);
        if (s.type != dtype_of<T>())
            fail("dtype mismatch: section '", name, "' holds ", to_string(s.type), " values but ",
                 to_string(dtype_of<T>()), " are required");
        if (s.shape != shape)
            fail("shape mismatch: section '", name, "' is ", detail::extents_string(s.shape), " but ",
                 detail::extents_string(shape), " is required");
        return s;
    }

    /// The value of a rank-0 section of type T.
    template <class T>
    T scalar(std::string_view name) const
    {
        const checkpoint_section& s = expect<T>(name, {});
        return detail::get<T>(bytes_.data() + s.offset);
    }

    /// Copies the values of `s` (found through this reader, checked to hold `count` values of T) to `out`.
    template <class T>
    void copy(const checkpoint_section& s, T* out, std::uint64_t count) const
    {
        if (s.type != dtype_of<T>() || s.count != count)
            fail("copy of section '", s.name, "': ", count, " ", to_string(dtype_of<T>()),
                 " values requested, it holds ", s.count, " ", to_string(s.type));
        if (count) std::memcpy(out, bytes_.data() + s.offset, static_cast<std::size_t>(s.bytes));
    }

    /// Copies the (rows, cols) section `name` into `out` (any leading dimension) after checking it.
    template <class T>
    void read(std::string_view name, matrix_view<T> out) const
    {
        detail::check_view(out, "checkpoint_reader::read", "the destination");
        const checkpoint_section& s = expect<T>(
            name, {static_cast<std::uint64_t>(out.rows), static_cast<std::uint64_t>(out.cols)});
        const std::size_t row_bytes = static_cast<std::size_t>(out.cols) * sizeof(T);
        for (index_t i = 0; i < out.rows && row_bytes > 0; ++i)
            std::memcpy(out.row(i), bytes_.data() + s.offset + static_cast<std::uint64_t>(i) * row_bytes, row_bytes);
    }

private:
    template <class... Parts>
    [[noreturn]] static void fail_in(const std::string& source, Parts&&... parts)
    {
        COMPACT_FAIL("checkpoint_reader", "'", source, "': ", std::forward<Parts>(parts)...);
    }
    template <class... Parts>
    [[noreturn]] void fail(Parts&&... parts) const
    {
        fail_in(source_, std::forward<Parts>(parts)...);
    }

    /// Reads up to `bytes` bytes into `out` (fewer only at the end of the file); `got` says how many.
    /// 0, or the errno of the failure.
    static int read_all(int fd, unsigned char* out, std::size_t bytes, std::size_t& got)
    {
        got = 0;
        while (got < bytes) {
            const ::ssize_t n = ::read(fd, out + got, bytes - got);
            if (n < 0) {
                if (errno == EINTR) continue;
                return errno;
            }
            if (n == 0) break;
            got += static_cast<std::size_t>(n);
        }
        return 0;
    }

    /// What the header says, once check_header has accepted it.
    struct header_fields {
        std::uint32_t version = 0;
        std::uint64_t count = 0;    ///< sections
        std::uint64_t declared = 0; ///< file bytes
    };

    /// Checks the header at `b`, of which `size` bytes exist (fewer than 40: a short file). Raises
    /// "not a compact checkpoint", "newer format version", "truncated", "checksum mismatch" or "corrupt".
    static header_fields check_header(const unsigned char* b, std::uint64_t size, const std::string& source)
    {
        const auto& magic = detail::checkpoint_magic;
        const std::size_t prefix = size < sizeof magic ? static_cast<std::size_t>(size) : sizeof magic;
        if (prefix > 0 && std::memcmp(b, magic, prefix) != 0)
            fail_in(source, "not a compact checkpoint: bad magic (the first 8 bytes must be 89 43 4B 50 0D 0A 1A 0A)");
        if (size < 12) fail_in(source, "truncated: the file has ", size, " bytes, fewer than its 40-byte header");
        header_fields h;
        // The version comes before the header checksum: a newer version may lay its header out differently.
        h.version = detail::get<std::uint32_t>(b + 8);
        if (h.version > checkpoint_format_version)
            fail_in(source, "newer format version ", h.version, ": this build of compact reads versions 1 to ",
                    checkpoint_format_version);
        if (h.version == 0) fail_in(source, "corrupt header: format version 0");
        if (size < detail::checkpoint_header_bytes)
            fail_in(source, "truncated: the file has ", size, " bytes, fewer than its 40-byte header");
        const std::uint64_t stored = detail::get<std::uint64_t>(b + 32), computed = crc64(0, b, 32);
        if (stored != computed)
            fail_in(source, "checksum mismatch in the header: stored ", detail::hex64(stored), ", computed ",
                    detail::hex64(computed));
        h.count = detail::get<std::uint64_t>(b + 16);
        h.declared = detail::get<std::uint64_t>(b + 24);
        if (detail::get<std::uint32_t>(b + 12) != 0)
            fail_in(source, "corrupt header: reserved bytes 12-15 are not zero");
        return h;
    }

    void parse()
    {
        const std::uint64_t size = bytes_.size();
        const header_fields h = check_header(bytes_.data(), size, source_);
        version_ = h.version;
        const std::uint64_t count = h.count, declared = h.declared;
        if (size < declared) fail("truncated: the file has ", size, " bytes but its header declares ", declared);
        if (size > declared)
            fail("corrupt: the file has ", size, " bytes but its header declares ", declared,
                 " (trailing bytes after the last section)");
        // Every section takes at least 32 bytes: a bound on count that needs no allocation trust.
        if (count > (size - detail::checkpoint_header_bytes) / 32)
            fail("corrupt header: ", count, " sections cannot fit in ", size, " bytes");

        sections_.reserve(static_cast<std::size_t>(count));
        std::uint64_t at = detail::checkpoint_header_bytes;
        for (std::uint64_t k = 0; k < count; ++k) at = parse_section(k, at);
        if (at != size)
            fail("corrupt: the header declares ", count, " sections, which end at byte ", at, " of ", size);
    }

    /// Validates the section that starts at byte `at` (the k-th); returns where the next one starts.
    std::uint64_t parse_section(std::uint64_t k, std::uint64_t at)
    {
        const std::uint64_t size = bytes_.size();
        const unsigned char* s = bytes_.data() + at;
        const std::uint64_t left = size - at;
        auto where = [&] { return detail::concat("section #", k, " at byte ", at); };
        if (left < 16) fail("corrupt: ", where(), " overruns the file (", left, " bytes left)");
        const std::uint64_t payload = detail::get<std::uint64_t>(s);
        const std::uint64_t name_bytes = detail::get<std::uint16_t>(s + 8);
        const std::uint64_t rank = s[11];
        if (rank > detail::checkpoint_max_rank) fail("corrupt: ", where(), " has rank ", rank, " (at most 8)");
        const std::uint64_t head = 16 + 8 * rank + detail::pad8(name_bytes);
        // head <= 16 + 64 + 65536, so only the payload can overflow: compare before adding.
        if (head > left || payload > left - head || detail::pad8(payload) + 8 > left - head)
            fail("corrupt: ", where(), " (", payload, " payload bytes) overruns the file (", left, " bytes left)");
        const std::uint64_t body = head + detail::pad8(payload);
        const std::uint64_t stored = detail::get<std::uint64_t>(s + body), computed = crc64(0, s, body);
        const std::string name(reinterpret_cast<const char*>(s + 16 + 8 * rank), static_cast<std::size_t>(name_bytes));
        if (stored != computed)
            fail("checksum mismatch in ", where(), " ('", detail::printable_name(name) ? name : "<unprintable>",
                 "'): stored ", detail::hex64(stored), ", computed ", detail::hex64(computed));

        // The checksum holds, so what follows is what a writer wrote; these only catch other writers.
        if (!detail::printable_name(name)) fail("corrupt: ", where(), " has an empty or unprintable name");
        const auto type = static_cast<dtype>(s[10]);
        const std::uint64_t value_bytes = dtype_size(type);
        if (value_bytes == 0) fail("corrupt: section '", name, "' has unknown dtype code ", unsigned(s[10]));
        if (detail::get<std::uint32_t>(s + 12) != 0) fail("corrupt: section '", name, "' has nonzero reserved bytes");
        checkpoint_section out;
        out.name = name;
        out.type = type;
        out.count = 1;
        for (std::uint64_t d = 0; d < rank; ++d) {
            const std::uint64_t e = detail::get<std::uint64_t>(s + 16 + 8 * d);
            out.shape.push_back(e);
            if (e != 0 && out.count > payload / e)
                fail("corrupt: section '", name, "' has shape ", detail::extents_string(out.shape),
                     "... but only ", payload, " payload bytes");
            out.count *= e;
        }
        if (out.count > payload / value_bytes || out.count * value_bytes != payload)
            fail("corrupt: section '", name, "' has shape ", detail::extents_string(out.shape), " of ", to_string(type),
                 " but ", payload, " payload bytes");
        for (std::uint64_t p = 16 + 8 * rank + name_bytes; p < head; ++p)
            if (s[p] != 0) fail("corrupt: section '", name, "' has nonzero padding after its name");
        for (std::uint64_t p = head + payload; p < body; ++p)
            if (s[p] != 0) fail("corrupt: section '", name, "' has nonzero padding after its values");
        out.offset = at + head;
        out.bytes = payload;
        if (!index_.emplace(name, sections_.size()).second) fail("corrupt: section '", name, "' appears twice");
        sections_.push_back(std::move(out));
        return at + body + 8;
    }

    std::vector<unsigned char> bytes_;
    std::string source_;
    std::uint32_t version_ = 0;
    std::vector<checkpoint_section> sections_;
    std::map<std::string, std::size_t, std::less<>> index_;
};

COMPACT_NAMESPACE_END
