#include "cpu/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fp4::cpu {
namespace {

// Waits until done() holds, polling for up to kSpin first (yielding the core to anything else that
// can run): a call's threads are back on the next call within microseconds when a model runs layer
// after layer, and a sleeping thread takes tens of microseconds to wake on a VM (measured on a
// 2-core VM: a (2048, 768) batch-1 layer took 149 us on two threads and 108 on one; polling, 62 -
// 71). Returns done().
constexpr auto kSpin = std::chrono::microseconds(50);
template <typename Done>
bool spin_until(Done&& done) {
  const auto give_up = std::chrono::steady_clock::now() + kSpin;
  for (int i = 1;; ++i) {
    if (done()) return true;
    std::this_thread::yield();  // (a pause instead held the core from torch's own threads: a model
                                // with LayerNorm and GELU between fp4 layers ran 13-17% slower)
    if (i % 64 == 0 && std::chrono::steady_clock::now() > give_up) return done();
  }
}

class Pool {
 public:
  Pool() : size_(std::max(1u, std::thread::hardware_concurrency())) {}
  ~Pool() { stop_workers(); }

  int size() const { return size_; }

  void resize(int n) {
    std::lock_guard<std::mutex> call(call_mutex_);
    stop_workers();
    size_ = std::max(1, n);
  }

  void run(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
    if (count <= 0) return;
    const int64_t max_chunks = std::max<int64_t>(1, count / std::max<int64_t>(1, grain));
    const int chunks = int(std::min<int64_t>(size_, max_chunks));
    if (chunks <= 1) {
      body(0, count);
      return;
    }
    std::lock_guard<std::mutex> call(call_mutex_);  // one parallel region at a time
    start_workers(chunks - 1);
    bool anyone_asleep;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body_ = &body;
      count_ = count;
      chunks_ = chunks;
      next_chunk_ = 1;  // chunk 0 is the caller's
      pending_ = chunks - 1;
      error_ = nullptr;
      ++generation_;
      anyone_asleep = asleep_ > 0;
    }
    if (anyone_asleep) wake_.notify_all();
    run_chunk(0);
    if (!spin_until([&] { return pending_ == 0; })) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return pending_ == 0; });
    }
    body_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void run_chunk(int chunk) {
    const int64_t begin = count_ * chunk / chunks_;
    const int64_t end = count_ * (chunk + 1) / chunks_;
    try {
      (*body_)(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void worker() {
    uint64_t seen = 0;
    for (;;) {
      auto news = [&] { return stopping_ || generation_ != seen; };
      if (!spin_until(news)) {
        std::unique_lock<std::mutex> lock(mutex_);
        ++asleep_;
        wake_.wait(lock, news);
        --asleep_;
      }
      if (stopping_) return;
      seen = generation_;
      // (a chunk claimed here always belongs to the current call: the next one starts only
      // after every chunk of this one has finished)
      for (int chunk = next_chunk_++; chunk < chunks_; chunk = next_chunk_++) {
        run_chunk(chunk);
        if (--pending_ == 0) {
          std::lock_guard<std::mutex> lock(mutex_);
          done_.notify_one();
        }
      }
    }
  }

  void start_workers(int n) {
    while (int(workers_.size()) < n) workers_.emplace_back([this] { worker(); });
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stopping_ = false;
  }

  int size_;
  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t count_ = 0;
  int asleep_ = 0;
  // (atomics: read by spinning threads outside the mutex)
  std::atomic<int> chunks_{0}, next_chunk_{0}, pending_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stopping_{false};
  std::exception_ptr error_;
};

Pool& pool() {
  static Pool instance;
  return instance;
}

}  // namespace

int num_threads() { return pool().size(); }
void set_num_threads(int n) { pool().resize(n); }

void parallel_for(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  pool().run(count, grain, body);
}

}  // namespace fp4::cpu
