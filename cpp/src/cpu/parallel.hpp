// A small persistent thread pool for the CPU kernels.
//
// libfp4 does not use OpenMP so that it never shares (or fights) a framework's OpenMP runtime: the
// pool's size is set by fp4_set_num_threads (the Python layer passes torch.get_num_threads()), and a
// call runs while the caller's own threads wait for it, so the cores are never oversubscribed. After
// a call the workers poll for the next one for 50 us (yielding the core) before they sleep.
#pragma once

#include <cstdint>
#include <functional>

namespace fp4::cpu {

int num_threads();
void set_num_threads(int n);

// Calls body(begin, end) over [0, count) split into contiguous chunks of at least `grain` items,
// on up to num_threads() threads (the calling thread takes a share). Exceptions from `body` are
// rethrown on the calling thread.
void parallel_for(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

}  // namespace fp4::cpu
