// Errors inside libfp4: C++ code throws fp4::Error; the C entry points catch it (no exception ever
// crosses the C ABI), store the message in a thread-local slot and return the status.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "fp4/fp4.h"

namespace fp4 {

class Error : public std::runtime_error {
 public:
  Error(fp4_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  fp4_status status() const noexcept { return status_; }

 private:
  fp4_status status_;
};

void set_last_error(const std::string& message);
const char* last_error_message();

template <typename... Parts>
[[noreturn]] void fail(fp4_status status, Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  throw Error(status, os.str());
}

template <typename... Parts>
[[noreturn]] void invalid_argument(Parts&&... parts) {
  fail(FP4_ERROR_INVALID_ARGUMENT, std::forward<Parts>(parts)...);
}

// Runs `body` and turns whatever it throws into a status plus a thread-local message.
template <typename Body>
fp4_status guarded(const char* function, Body&& body) noexcept {
  try {
    set_last_error("");
    body();
    return FP4_SUCCESS;
  } catch (const Error& e) {
    set_last_error(std::string(function) + ": " + e.what());
    return e.status();
  } catch (const std::bad_alloc&) {
    set_last_error(std::string(function) + ": out of host memory");
    return FP4_ERROR_INTERNAL;
  } catch (const std::exception& e) {
    set_last_error(std::string(function) + ": internal error: " + e.what());
    return FP4_ERROR_INTERNAL;
  } catch (...) {
    set_last_error(std::string(function) + ": unknown internal error");
    return FP4_ERROR_INTERNAL;
  }
}

}  // namespace fp4
