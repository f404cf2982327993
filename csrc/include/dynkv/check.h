// Error reporting shared by every translation unit. Bad input from the caller
// raises InvalidArgument (ValueError in Python); failures of the platform
// (CUDA, the OS) raise RuntimeError with the platform's own message.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace dynkv {

class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace dynkv

// DYNKV_CHECK(cond, "what was wrong", value, "what was expected", ...)
#define DYNKV_CHECK(cond, ...)                                             \
  do {                                                                     \
    if (!(cond)) {                                                         \
      throw ::dynkv::InvalidArgument(::dynkv::detail::concat(__VA_ARGS__)); \
    }                                                                      \
  } while (0)

#define DYNKV_FAIL(...) throw std::runtime_error(::dynkv::detail::concat(__VA_ARGS__))
