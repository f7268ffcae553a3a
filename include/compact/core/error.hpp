// compact/core/error.hpp: the library's one error type and the checks that raise it.
//
// Every public entry point validates its arguments before it touches memory, and reports a violation as
// compact::error whose message names the function, the argument and the shapes involved, e.g.
//   "compressed_linear::forward: X is (8, 63) but the layer expects (N, 64)".
//
// No-exceptions builds: define COMPACT_ERROR_HANDLER(message) before including any compact header to
// a function-like macro (or function) taking `const char*` that must not return, e.g. one that logs
// and calls std::abort(). The library never calls exit() and never prints.
#pragma once

#include "compact/core/config.hpp"

#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

COMPACT_NAMESPACE_BEGIN

/// Thrown for every invalid argument, shape mismatch or failed backend call.
class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts)
{
    std::ostringstream out;
    (out << ... << std::forward<Parts>(parts));
    return out.str();
}

[[noreturn]] inline void raise(const std::string& message)
{
#if defined(COMPACT_ERROR_HANDLER)
    COMPACT_ERROR_HANDLER(message.c_str());
    std::abort(); // the handler must not return; stop here if it does
#else
    throw error(message);
#endif
}

} // namespace detail

COMPACT_NAMESPACE_END

/// Raise compact::error with a message built from the streamed parts. `where` names the function.
#define COMPACT_FAIL(where, ...) ::compact::detail::raise(::compact::detail::concat(where, ": ", __VA_ARGS__))

/// Check a precondition; on failure raise compact::error with the streamed message parts.
#define COMPACT_REQUIRE(cond, where, ...)                                                                  \
    do {                                                                                                   \
        if (!(cond)) COMPACT_FAIL(where, __VA_ARGS__);                                                     \
    } while (false)
