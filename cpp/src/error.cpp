#include "error.hpp"

namespace fp4 {
namespace {
thread_local std::string last_error;
}

void set_last_error(const std::string& message) { last_error = message; }

const char* last_error_message() { return last_error.c_str(); }

}  // namespace fp4

extern "C" const char* fp4_last_error(void) { return fp4::last_error_message(); }
