// The runtime of the CUDA emulator (csrc/emu/cuda_emu.h describes the model): the CTA schedulers and their
// fibers, rendezvous, the watchdog, the PTX twins, and the CUDA runtime calls the kernels' host code makes,
// answered as an H100 would (132 SMs, 227 KB of shared memory per block, clusters of up to 16).
//
// The emulator's own bookkeeping is not kernel memory: under ThreadSanitizer its functions are not instrumented
// (EMU_FN) and every synchronisation it provides is annotated instead (release on arrival, acquire on departure),
// so TSan reports exactly the kernels' own missing happens-before edges. Fibers are TSan fibers switched without
// synchronisation, and AddressSanitizer is told about every stack switch.
#include "emu/cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(FUSEDRNN_EMU_UCONTEXT) || !__has_include(<boost/context/detail/fcontext.hpp>)
#define EMU_BOOST 0
#include <ucontext.h>
#else
#define EMU_BOOST 1
#include <boost/context/detail/fcontext.hpp>  // Debian libboost-context-dev
namespace bctx = boost::context::detail;
#endif

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin(void);  // libtsan's; not declared by GCC 12's header
extern "C" void __tsan_ignore_thread_end(void);
#define EMU_TSAN 1
#define EMU_FN __attribute__((no_sanitize_thread))
#else
#define EMU_TSAN 0
#define EMU_FN
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace emu {

namespace {

// H100 SXM (the limits the planner is tested against in tests/test_cuda_static.py).
constexpr int kSmCount = 132;
constexpr int kSmemPerBlockOptin = 227 * 1024;
constexpr int kSmemPerSm = 228 * 1024;
constexpr int kReservedSmemPerBlock = 1024;
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kMaxCluster = 16, kMaxPortableCluster = 8;

enum class Wait : uint8_t { None, SyncThreads, Warp, Cluster, Spin, Failed };

const char* wait_name(Wait w) {
  switch (w) {
    case Wait::None: return "running";
    case Wait::SyncThreads: return "__syncthreads";
    case Wait::Warp: return "a warp collective";
    case Wait::Cluster: return "barrier.cluster.wait";
    case Wait::Spin: return "a spin on ld.acquire / ld.relaxed";
    case Wait::Failed: return "a failure";
  }
  return "?";
}

struct Rendezvous {
  int expected = 0, arrived = 0;
  unsigned gen = 0;
};

#if EMU_BOOST
using Context = bctx::fcontext_t;
#else
using Context = ucontext_t;
#endif

struct Stack {
  unsigned char* base = nullptr;  // lowest address (the canary), size bytes in all
  size_t size = 0;
};

struct Fiber {
  Context ctx{};
  Stack stack;
  void* tsan = nullptr;
  void* asan_fake = nullptr;
  uint3 tid{};
  int linear = 0;
  bool done = false;
  Wait wait = Wait::None;
  const unsigned* wait_gen = nullptr;  // waiting for *wait_gen != wait_seen (a local rendezvous): not worth resuming
  const std::atomic<unsigned>* wait_atomic = nullptr;  // the same for a counter other CTAs advance (a cluster barrier)
  unsigned wait_seen = 0;              // before it changes
  unsigned cluster_arrivals = 0;       // barrier.cluster.arrive executed so far: the next one is in phase cluster_arrivals
  bool cluster_pending = false;        // arrived, not yet waited
  std::vector<std::pair<void*, const void*>> async;  // cp.async copies not yet waited for
};

struct WarpState {
  Rendezvous bar;
  WarpCombine combine = nullptr;
  const void* ctx = nullptr;
  int first_lane = -1;
  alignas(16) unsigned char in[32][64];
  alignas(16) unsigned char out[32][64];
};

struct Grid;

struct Cta {
  Grid* grid = nullptr;
  uint3 bid{};
  int linear = 0;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  Rendezvous bar;
  int cluster_arrived = 0;  // threads of this CTA arrived in the current phase of the cluster barrier
  Context sched{};
  void* sched_tsan = nullptr;
  void* sched_asan_fake = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  Fiber* cur = nullptr;
  unsigned char* smem = nullptr;
  uint64_t local_releases = 0;
  std::atomic<bool> exited{false};
  char start_sync = 0, end_sync = 0;  // TSan: the scheduler's setup happens-before each fiber, each fiber before the end
};

struct ClusterBarrier {
  std::atomic<unsigned> arrived{0};  // CTAs arrived in the current phase
  std::atomic<unsigned> gen{0};      // phases completed
  char sync[2] = {};                 // TSan: the sync objects of even and odd phases
};

struct Grid {
  KernelBody body = nullptr;
  void* closure = nullptr;
  std::string name;
  dim3 grid, block;
  size_t smem = 0;
  LaunchKind kind = LaunchKind::Plain;
  int cluster = 1;
  std::vector<std::unique_ptr<Cta>> ctas;
  std::unique_ptr<ClusterBarrier[]> cluster_bars;
  std::vector<unsigned char> smem_store;
  std::atomic<bool> cancel{false};
  std::atomic<int> next_cta{0};
  std::mutex mu;
  std::string error;
};

thread_local Cta* t_cta = nullptr;
std::atomic<uint64_t> g_progress{0};

std::mutex g_error_mu;
std::string g_error_text;  // the detail of the last emulator error (cudaGetErrorString's answer for it)
thread_local cudaError_t t_last_error = cudaSuccess;

EMU_FN int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return fallback;
  return std::atoi(v);
}

EMU_FN size_t stack_bytes() {
  static const size_t bytes = [] {
    const int sanitizers = EMU_TSAN || EMU_ASAN;
    return static_cast<size_t>(std::max(32, env_int("FUSEDRNN_EMU_STACK_KB", sanitizers ? 512 : 128))) << 10;
  }();
  return bytes;
}

// Fiber stacks, recycled. Mapped 256 at a time (one mapping each: a launch of 128 CTAs x 256 threads would
// otherwise exceed the kernel's 65530 mappings per process), with a canary at the bottom of each, checked when
// the stack is returned: an overflow is reported instead of corrupting a neighbour silently.
constexpr size_t kStacksPerMap = 256;
constexpr uint64_t kCanary = 0x5afe57ac6b0770f5ull;
std::mutex g_stack_mu;
std::vector<Stack> g_stacks;

EMU_FN Stack take_stack() {
  std::lock_guard<std::mutex> lock(g_stack_mu);
  if (g_stacks.empty()) {
    const size_t bytes = stack_bytes();
    void* p = mmap(nullptr, bytes * kStacksPerMap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "fusedrnn cuda-emu: cannot map %zu fiber stacks of %zu bytes\n", kStacksPerMap, bytes);
      std::abort();
    }
    for (size_t i = 0; i < kStacksPerMap; ++i) {
      Stack s;
      s.base = static_cast<unsigned char*>(p) + i * bytes;
      s.size = bytes;
      std::memcpy(s.base, &kCanary, sizeof(kCanary));
      g_stacks.push_back(s);
    }
  }
  Stack s = g_stacks.back();
  g_stacks.pop_back();
  return s;
}

// false if the fiber that used it overflowed its stack (the canary is gone)
EMU_FN bool give_stack(Stack s) {
#if EMU_ASAN
  __asan_unpoison_memory_region(s.base, s.size);  // an abandoned fiber leaves poisoned frames
#endif
  const bool intact = std::memcmp(s.base, &kCanary, sizeof(kCanary)) == 0;
  std::memcpy(s.base, &kCanary, sizeof(kCanary));
  std::lock_guard<std::mutex> lock(g_stack_mu);
  g_stacks.push_back(s);
  return intact;
}

// ---- context switches ----
EMU_FN void fiber_body(Cta* c);

#if EMU_BOOST
EMU_FN void fiber_entry(bctx::transfer_t t) {
  Cta* c = t_cta;
  c->sched = t.fctx;
  fiber_body(c);
}
#else
EMU_FN void fiber_entry() { fiber_body(t_cta); }
#endif

// Scheduler -> fiber f, until f yields or finishes.
EMU_FN void resume(Cta* c, Fiber& f) {
  c->cur = &f;
  threadIdx = f.tid;
#if EMU_TSAN
  __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&c->sched_asan_fake, f.stack.base, f.stack.size);
#endif
#if EMU_BOOST
  f.ctx = bctx::jump_fcontext(f.ctx, nullptr).fctx;
#else
  swapcontext(&c->sched, &f.ctx);
#endif
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(c->sched_asan_fake, nullptr, nullptr);
#endif
}

// Fiber -> its scheduler (resumed later where it left).
EMU_FN void suspend(Cta* c, bool finished) {
  Fiber* f = c->cur;
#if EMU_TSAN
  __tsan_switch_to_fiber(c->sched_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f->asan_fake, c->sched_stack_bottom, c->sched_stack_size);
#endif
#if EMU_BOOST
  c->sched = bctx::jump_fcontext(c->sched, nullptr).fctx;
#else
  swapcontext(&f->ctx, &c->sched);
#endif
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake, &c->sched_stack_bottom, &c->sched_stack_size);
#endif
  (void)f;
  (void)finished;
}

EMU_FN void fiber_body(Cta* c) {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &c->sched_stack_bottom, &c->sched_stack_size);
#endif
#if EMU_TSAN
  __tsan_acquire(&c->start_sync);
#endif
  Grid* g = c->grid;
  g->body(g->closure);
  Fiber* f = c->cur;
  if (!f->async.empty()) {  // the GPU would complete them; a kernel that never waits is a bug the tests want
    std::lock_guard<std::mutex> lock(g->mu);
    if (g->error.empty()) {
      g->error = "thread " + std::to_string(f->linear) + " of CTA " + std::to_string(c->linear) +
                 " exited with cp.async copies it never waited for";
    }
    g->cancel = true;
  }
#if EMU_TSAN
  __tsan_release(&c->end_sync);
#endif
  f->done = true;
  suspend(c, /*finished=*/true);
  std::abort();  // never resumed
}

EMU_FN void block(Wait why, const unsigned* gen = nullptr, unsigned seen = 0,
                  const std::atomic<unsigned>* atomic_gen = nullptr) {
  Cta* c = t_cta;
  c->cur->wait = why;
  c->cur->wait_gen = gen;
  c->cur->wait_atomic = atomic_gen;
  c->cur->wait_seen = seen;
  suspend(c, false);
  c->cur->wait = Wait::None;
  c->cur->wait_gen = nullptr;
  c->cur->wait_atomic = nullptr;
}

// Records the first failure of the launch, cancels it, and parks this fiber for good.
[[noreturn]] EMU_FN void fail(const std::string& what) {
  Cta* c = t_cta;
  Grid* g = c->grid;
  {
    std::lock_guard<std::mutex> lock(g->mu);
    if (g->error.empty()) {
      const uint3 t = c->cur != nullptr ? c->cur->tid : uint3{};
      g->error = what + " (thread " + std::to_string(t.x) + " of CTA " + std::to_string(c->linear) + ")";
    }
  }
  g->cancel = true;
  for (;;) block(Wait::Failed);
}

// A rendezvous of the fibers of this CTA (all on this OS thread: plain counters).
EMU_FN void arrive_and_wait(Rendezvous& r, Wait why) {
  Cta* c = t_cta;
#if EMU_TSAN
  __tsan_release(&r);
#endif
  const unsigned gen = r.gen;
  if (++r.arrived == r.expected) {
    r.arrived = 0;
    ++r.gen;
    ++c->local_releases;
    g_progress.fetch_add(1, std::memory_order_relaxed);
  } else {
    while (r.gen == gen) block(why, &r.gen, gen);
  }
#if EMU_TSAN
  __tsan_acquire(&r);
#endif
}

EMU_FN std::string describe_waits(Cta& c) {
  int count[6] = {};
  int done = 0;
  for (const Fiber& f : c.fibers) {
    if (f.done) {
      ++done;
    } else {
      ++count[static_cast<int>(f.wait)];
    }
  }
  std::string s = "CTA " + std::to_string(c.linear) + ":";
  for (int w = 0; w < 6; ++w) {
    if (count[w] > 0) s += " " + std::to_string(count[w]) + " at " + wait_name(static_cast<Wait>(w)) + ",";
  }
  if (done > 0) s += " " + std::to_string(done) + " exited,";
  s.pop_back();
  return s;
}

EMU_FN void run_cta(Grid& g, Cta& c) {
  t_cta = &c;
  blockIdx = c.bid;
  blockDim = g.block;
  gridDim = g.grid;
  const int n = static_cast<int>(g.block.x * g.block.y * g.block.z);
  c.fibers.resize(n);
  c.warps.resize((n + 31) / 32);
  for (size_t w = 0; w < c.warps.size(); ++w) c.warps[w].bar.expected = std::min(32, n - static_cast<int>(w) * 32);
  c.bar.expected = n;
#if EMU_TSAN
  c.sched_tsan = __tsan_get_current_fiber();
  __tsan_release(&c.start_sync);
#endif
  for (int i = 0; i < n; ++i) {
    Fiber& f = c.fibers[i];
    f.linear = i;
    f.tid = make_uint3(i % g.block.x, (i / g.block.x) % g.block.y, i / (g.block.x * g.block.y));
    f.stack = take_stack();
#if EMU_BOOST
    f.ctx = bctx::make_fcontext(f.stack.base + f.stack.size, f.stack.size, fiber_entry);
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.base;
    f.ctx.uc_stack.ss_size = f.stack.size;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
#endif
#if EMU_TSAN
    f.tsan = __tsan_create_fiber(0);
#endif
  }
  int idle = 0;
  for (int live = n; live > 0 && !g.cancel.load(std::memory_order_relaxed);) {
    const uint64_t releases = c.local_releases;
    bool all_local = true;
    live = 0;
    for (Fiber& f : c.fibers) {
      if (f.done) continue;
      if ((f.wait_gen != nullptr && *f.wait_gen == f.wait_seen) ||
          (f.wait_atomic != nullptr && f.wait_atomic->load(std::memory_order_relaxed) == f.wait_seen)) {
        ++live;  // still blocked: skip the two switches
        all_local = all_local && (f.wait == Wait::SyncThreads || f.wait == Wait::Warp);
        continue;
      }
      resume(&c, f);
      if (f.done) {
        g_progress.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      ++live;
      all_local = all_local && (f.wait == Wait::SyncThreads || f.wait == Wait::Warp);
    }
    if (live == 0 || c.local_releases != releases) {
      idle = 0;
      continue;
    }
    if (all_local) {  // every live thread waits for another thread of this CTA: none will come
      std::lock_guard<std::mutex> lock(g.mu);
      if (g.error.empty()) g.error = "deadlock in one CTA: " + describe_waits(c);
      g.cancel = true;
      break;
    }
    // Waiting on other CTAs: let them run (2 cores may carry dozens of CTA threads).
    if (++idle < 32) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(idle < 2000 ? 20 : 200));
    }
  }
#if EMU_TSAN
  for (Fiber& f : c.fibers) {  // a cancelled launch abandons fibers midway: what they did precedes the end too
    if (f.done) continue;
    __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
    __tsan_release(&c.end_sync);
    __tsan_switch_to_fiber(c.sched_tsan, __tsan_switch_to_fiber_no_sync);
  }
  __tsan_acquire(&c.end_sync);
#endif
  c.exited = true;
  bool overflow = false;
  for (Fiber& f : c.fibers) {  // abandoned fibers (a cancelled launch) are simply never resumed
    overflow = !give_stack(f.stack) || overflow;
#if EMU_TSAN
    __tsan_destroy_fiber(f.tsan);
#endif
  }
  if (overflow) {
    std::lock_guard<std::mutex> lock(g.mu);
    if (g.error.empty()) {
      g.error = "a thread of CTA " + std::to_string(c.linear) + " overflowed its fiber stack of " +
                std::to_string(stack_bytes() >> 10) + " KB (FUSEDRNN_EMU_STACK_KB)";
    }
  }
  t_cta = nullptr;
}

EMU_FN Cta& cta() {
  Cta* c = t_cta;
  if (c == nullptr) {
    std::fprintf(stderr, "fusedrnn cuda-emu: a device function was called outside a kernel launch\n");
    std::abort();
  }
  return *c;
}

// Per-kernel attributes set by cudaFuncSetAttribute (the occupancy queries honour them).
struct FuncAttrs {
  int max_dynamic_smem = 48 * 1024;
  bool non_portable_cluster = false;
};
std::mutex g_attr_mu;
std::map<const void*, FuncAttrs> g_attrs;

EMU_FN FuncAttrs attrs_of(const void* func) {
  std::lock_guard<std::mutex> lock(g_attr_mu);
  auto it = g_attrs.find(func);
  return it == g_attrs.end() ? FuncAttrs{} : it->second;
}

EMU_FN int blocks_per_sm(int threads, size_t smem) {
  if (threads <= 0 || threads > 1024 || smem > static_cast<size_t>(kSmemPerBlockOptin)) return 0;
  const int by_threads = kMaxThreadsPerSm / threads;
  const int by_smem = static_cast<int>(kSmemPerSm / (smem + kReservedSmemPerBlock));
  return std::min({by_threads, by_smem, 32});
}

EMU_FN cudaError_t set_error(cudaError_t err, const std::string& text) {
  std::lock_guard<std::mutex> lock(g_error_mu);
  g_error_text = text;
  return err;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------------
EMU_FN cudaError_t run_grid(KernelBody body, void* closure, const char* name, dim3 grid, dim3 block, size_t smem,
                            LaunchKind kind, int cluster) {
  const long long nctas = static_cast<long long>(grid.x) * grid.y * grid.z;
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  const std::string what = std::string(name) + " <<<(" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                           std::to_string(grid.z) + "), " + std::to_string(threads) + ">>>";
  if (nctas <= 0 || threads <= 0 || threads > 1024) {
    return set_error(cudaErrorInvalidConfiguration, what + ": invalid launch configuration");
  }
  if (smem > static_cast<size_t>(kSmemPerBlockOptin)) {
    return set_error(cudaErrorInvalidValue, what + ": " + std::to_string(smem) + " bytes of dynamic shared memory, over 227 KB");
  }
  if (kind == LaunchKind::Cluster && (cluster < 1 || cluster > kMaxCluster || nctas % cluster != 0 || grid.y * grid.z != 1)) {
    return set_error(cudaErrorInvalidClusterSize, what + ": cluster of " + std::to_string(cluster) + " CTAs");
  }
  if (kind == LaunchKind::Cooperative && nctas > static_cast<long long>(kSmCount) * blocks_per_sm(static_cast<int>(threads), smem)) {
    return set_error(cudaErrorCooperativeLaunchTooLarge, what + ": cooperative grid larger than the GPU holds");
  }
  if (nctas > 4096) {  // one OS thread per resident CTA: keep launches to what a test needs
    return set_error(cudaErrorInvalidConfiguration, what + ": over 4096 CTAs (the emulator's limit)");
  }
  Grid g;
  g.body = body;
  g.closure = closure;
  g.name = what;
  g.grid = grid;
  g.block = block;
  g.smem = smem;
  g.kind = kind;
  g.cluster = kind == LaunchKind::Cluster ? cluster : 1;
  const size_t smem_stride = (smem + 127) / 128 * 128 + 128;
  g.smem_store.assign(smem_stride * static_cast<size_t>(nctas) + 128, 0xcd);  // uninitialised, visibly
  unsigned char* smem_base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(g.smem_store.data()) + 127) & ~uintptr_t(127));
  for (long long i = 0; i < nctas; ++i) {
    auto c = std::make_unique<Cta>();
    c->grid = &g;
    c->linear = static_cast<int>(i);
    c->bid = make_uint3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                        static_cast<unsigned>(i / (static_cast<long long>(grid.x) * grid.y)));
    c->smem = smem_base + smem_stride * static_cast<size_t>(i);
    g.ctas.push_back(std::move(c));
  }
  g.cluster_bars.reset(new ClusterBarrier[static_cast<size_t>(nctas / g.cluster)]);
#if EMU_ASAN
  for (auto& c : g.ctas) __asan_poison_memory_region(c->smem + smem, smem_stride - smem);  // past each CTA's smem
#endif

  // Co-resident launches get a thread per CTA; plain ones a few workers taking CTAs in turn (a plain launch
  // promises no co-residency: a kernel that needs it hangs, and the watchdog says so).
  const int workers = kind == LaunchKind::Plain
                          ? static_cast<int>(std::min<long long>(nctas, std::max(2u, std::thread::hardware_concurrency())))
                          : static_cast<int>(nctas);
  std::mutex done_mu;
  std::condition_variable done_cv;
  int finished = 0;
  auto work = [&]() {
    for (int i; (i = g.next_cta.fetch_add(1)) < nctas && !g.cancel.load();) run_cta(g, *g.ctas[i]);
    std::lock_guard<std::mutex> lock(done_mu);
    ++finished;
    done_cv.notify_one();
  };
  std::vector<std::thread> pool;
  pool.reserve(workers);
  try {
    for (int i = 0; i < workers; ++i) pool.emplace_back(work);
  } catch (const std::system_error& e) {  // out of threads: cancel what started
    {
      std::lock_guard<std::mutex> lock(g.mu);
      g.error = "cannot start a thread per CTA (" + std::to_string(pool.size()) + " started): " + e.what();
    }
    g.cancel = true;
    std::lock_guard<std::mutex> lock(done_mu);
    finished += workers - static_cast<int>(pool.size());
  }

  // Watchdog: no progress anywhere (a rendezvous completing, an atomic, a thread exiting) for that long is a hang.
  const double limit_s = std::max(1, env_int("FUSEDRNN_EMU_WATCHDOG_S", 60));
  uint64_t seen = g_progress.load();
  auto last = std::chrono::steady_clock::now();
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(done_mu);
      if (done_cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return finished == workers; })) break;
    }
    const uint64_t now_progress = g_progress.load();
    const auto now = std::chrono::steady_clock::now();
    if (now_progress != seen) {
      seen = now_progress;
      last = now;
    } else if (std::chrono::duration<double>(now - last).count() > limit_s && !g.cancel.load()) {
      std::string waits;
#if EMU_TSAN
      __tsan_ignore_thread_begin();  // a snapshot of running CTAs for the report: racy by nature, read only
#endif
      for (auto& c : g.ctas) {
        if (!c->exited && !c->fibers.empty()) waits += "\n  " + describe_waits(*c);
      }
#if EMU_TSAN
      __tsan_ignore_thread_end();
#endif
      {
        std::lock_guard<std::mutex> lock(g.mu);
        if (g.error.empty()) {
          g.error = "watchdog: no progress for " + std::to_string(static_cast<int>(limit_s)) +
                    " s (FUSEDRNN_EMU_WATCHDOG_S), cancelled; where the threads wait:" + waits;
        }
      }
      g.cancel = true;
    }
  }
  for (std::thread& t : pool) t.join();
#if EMU_ASAN
  __asan_unpoison_memory_region(g.smem_store.data(), g.smem_store.size());
#endif
  if (!g.error.empty()) {
    std::fprintf(stderr, "fusedrnn cuda-emu: %s: %s\n", what.c_str(), g.error.c_str());
    return set_error(cudaErrorLaunchFailure, what + ": " + g.error);
  }
  return cudaSuccess;
}

EMU_FN const char* error_message(cudaError_t err) {
  static thread_local std::string text;
  if (err == cudaSuccess) return "no error";
  {
    std::lock_guard<std::mutex> lock(g_error_mu);
    text = g_error_text.empty() ? std::string("cuda-emu error ") + std::to_string(static_cast<int>(err)) : g_error_text;
  }
  return text.c_str();
}

EMU_FN void record_launch_error(cudaError_t err) {
  if (err != cudaSuccess && t_last_error == cudaSuccess) t_last_error = err;
}

EMU_FN void trap(const char* file, int line) { fail(std::string("__trap() at ") + file + ":" + std::to_string(line)); }

EMU_FN void note_progress() { g_progress.fetch_add(1, std::memory_order_relaxed); }

// ---------------------------------------------------------------------------------------------------
// Device side
// ---------------------------------------------------------------------------------------------------
EMU_FN unsigned char* dynamic_smem_base() { return cta().smem; }

EMU_FN void syncthreads() { arrive_and_wait(cta().bar, Wait::SyncThreads); }

EMU_FN int lane_id() { return cta().cur->linear & 31; }

EMU_FN void warp_collective(const void* in, size_t in_bytes, void* out, size_t out_bytes, WarpCombine combine,
                            const void* ctx) {
  Cta& c = cta();
  const int lane = c.cur->linear & 31;
  WarpState& w = c.warps[c.cur->linear >> 5];
  if (w.bar.arrived == 0) {
    w.combine = combine;
    w.ctx = ctx;
    w.first_lane = lane;
  } else if (w.combine != combine) {
    fail("divergent warp: lane " + std::to_string(lane) + " and lane " + std::to_string(w.first_lane) +
         " are in different warp collectives at once");
  }
  if (in_bytes > 0) std::memcpy(w.in[lane], in, in_bytes);
#if EMU_TSAN
  __tsan_release(&w.bar);
#endif
  const unsigned gen = w.bar.gen;
  if (++w.bar.arrived == w.bar.expected) {
#if EMU_TSAN
    __tsan_acquire(&w.bar);
#endif
    if (combine != nullptr) combine(w.in, w.out, w.bar.expected, w.ctx);
#if EMU_TSAN
    __tsan_release(&w.bar);
#endif
    w.bar.arrived = 0;
    ++w.bar.gen;
    ++c.local_releases;
    g_progress.fetch_add(1, std::memory_order_relaxed);
  } else {
    while (w.bar.gen == gen) block(Wait::Warp, &w.bar.gen, gen);
  }
#if EMU_TSAN
  __tsan_acquire(&w.bar);
#endif
  if (out_bytes > 0) std::memcpy(out, w.out[lane], out_bytes);
}

EMU_FN void syncwarp() { warp_collective(nullptr, 0, nullptr, 0, nullptr, nullptr); }

EMU_FN void yield_spin() { block(Wait::Spin); }

// barrier.cluster.arrive / barrier.cluster.wait. Phase k of a cluster's barrier completes when every thread of
// its CTAs has arrived k+1 times (ClusterBarrier::gen counts completed phases); a thread's k-th arrive belongs to
// phase k. Arrive and wait alternate per thread, so no thread arrives in phase k+1 before phase k completed: one
// arrival counter per CTA and one per cluster suffice. ThreadSanitizer: arrive releases into the phase's sync object
// and wait acquires from it -- exactly the edges of .release / .acquire, no more (two objects by parity: a thread
// arriving in phase k+2 has waited for phase k+1, which follows every wait for phase k).
EMU_FN void cluster_arrive() {
  Cta& c = cta();
  Grid& g = *c.grid;
  Fiber& f = *c.cur;
  if (f.cluster_pending) fail("barrier.cluster.arrive twice without a barrier.cluster.wait between");
  ClusterBarrier& cb = g.cluster_bars[c.linear / g.cluster];
  const unsigned phase = f.cluster_arrivals++;
  f.cluster_pending = true;
#if EMU_TSAN
  __tsan_release(&cb.sync[phase & 1]);
#endif
  if (++c.cluster_arrived == c.bar.expected) {  // this CTA's last thread: the CTA has arrived
    c.cluster_arrived = 0;
    ++c.local_releases;
    if (cb.arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<unsigned>(g.cluster)) {
      cb.arrived.store(0, std::memory_order_relaxed);
      cb.gen.store(phase + 1, std::memory_order_release);
      g_progress.fetch_add(1, std::memory_order_relaxed);
    }
  }
}

EMU_FN void cluster_wait() {
  Cta& c = cta();
  Grid& g = *c.grid;
  Fiber& f = *c.cur;
  if (!f.cluster_pending) fail("barrier.cluster.wait without a barrier.cluster.arrive before it");
  ClusterBarrier& cb = g.cluster_bars[c.linear / g.cluster];
  const unsigned phase = f.cluster_arrivals - 1;
  while (cb.gen.load(std::memory_order_acquire) == phase) block(Wait::Cluster, nullptr, phase, &cb.gen);
  f.cluster_pending = false;
#if EMU_TSAN
  __tsan_acquire(&cb.sync[phase & 1]);
#endif
}

// cooperative_groups' cluster.sync(): arrive (release) and wait (acquire).
EMU_FN void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

EMU_FN unsigned cluster_size() { return static_cast<unsigned>(cta().grid->cluster); }
EMU_FN unsigned cluster_rank() { return static_cast<unsigned>(cta().linear % cta().grid->cluster); }

EMU_FN unsigned char* map_shared_rank(const void* local, unsigned rank) {
  Cta& c = cta();
  Grid& g = *c.grid;
  const ptrdiff_t off = static_cast<const unsigned char*>(local) - c.smem;
  if (off < 0 || static_cast<size_t>(off) >= g.smem) {
    fail("map_shared_rank of an address outside this CTA's dynamic shared memory (offset " + std::to_string(off) + ")");
  }
  if (rank >= static_cast<unsigned>(g.cluster)) {
    fail("map_shared_rank to rank " + std::to_string(rank) + " of a cluster of " + std::to_string(g.cluster));
  }
  Cta& other = *g.ctas[(c.linear / g.cluster) * g.cluster + static_cast<int>(rank)];
  if (other.exited.load()) fail("distributed shared memory of CTA rank " + std::to_string(rank) + ", which has exited");
  return other.smem + off;
}

// ---- PTX twins ----
namespace {
// mma operands of one lane: 6 registers in, c[4] in, d[4] out.
struct MmaIn {
  uint32_t reg[6];
  float c[4];
};
float half_bits_to_float(uint16_t h, MmaType t) {
  if (t == MmaType::BF16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}
float tf32_bits_to_float(uint32_t u) {  // the tensor core reads the upper 19 bits of a tf32 operand
  u &= 0xffffe000u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// D = A B + C of a 16 x 8 tile: the operands decoded once from the lanes' registers (a_at / b_at give the lane,
// register and half of each element), products exact, summed in double and rounded once (the tensor core's
// internal rounding is finer than a chain of fp32 FMAs; the two agree whenever the sums are exact in fp32).
template <int K, typename Decode, typename AAt, typename BAt>
void mma_tile(const unsigned char (*ins)[64], unsigned char (*outs)[64], Decode decode, AAt a_at, BAt b_at) {
  MmaIn in[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&in[l], ins[l], sizeof(MmaIn));
  double A[16][K], B[K][8];
  for (int row = 0; row < 16; ++row) {
    for (int k = 0; k < K; ++k) {
      int lane, reg, half;
      a_at(row, k, &lane, &reg, &half);
      A[row][k] = decode(in[lane].reg[reg], half);
    }
  }
  for (int k = 0; k < K; ++k) {
    for (int col = 0; col < 8; ++col) {
      int lane, reg, half;
      b_at(k, col, &lane, &reg, &half);
      B[k][col] = decode(in[lane].reg[reg], half);
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, tig = l & 3;
    float d[4];
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
      double acc = in[l].c[i];
      for (int k = 0; k < K; ++k) acc += A[row][k] * B[k][col];
      d[i] = static_cast<float>(acc);
    }
    std::memcpy(outs[l], d, sizeof(d));
  }
}
// m16n8k16, 16-bit operands (PTX ISA, "Matrix Fragments for mma.m16n8k16"): groupID g = lane >> 2,
// threadID_in_group t = lane % 4. A row-major: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
// a3 = (g+8, 2t+8..), the lower column in the low half. B column-major: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., g).
// C/D: c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1).
template <MmaType kType>
void mma16_combine(const unsigned char (*ins)[64], unsigned char (*outs)[64], int lanes, const void*) {
  if (lanes != 32) return;  // a partial warp cannot issue mma.sync.aligned (mma() fails before)
  auto decode = [](uint32_t reg, int half) {
    return static_cast<double>(half_bits_to_float(static_cast<uint16_t>(reg >> (16 * half)), kType));
  };
  auto a_at = [](int row, int k, int* lane, int* reg, int* half) {
    *lane = (row & 7) * 4 + (k & 7) / 2;
    *reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    *half = k & 1;
  };
  auto b_at = [](int k, int col, int* lane, int* reg, int* half) {
    *lane = col * 4 + (k & 7) / 2;
    *reg = 4 + (k >= 8 ? 1 : 0);
    *half = k & 1;
  };
  mma_tile<16>(ins, outs, decode, a_at, b_at);
}
// m16n8k8, tf32: a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4); b0 = (k t, n g), b1 = (k t+4, n g).
void mma8_tf32_combine(const unsigned char (*ins)[64], unsigned char (*outs)[64], int lanes, const void*) {
  if (lanes != 32) return;
  auto decode = [](uint32_t reg, int) { return static_cast<double>(tf32_bits_to_float(reg)); };
  auto a_at = [](int row, int k, int* lane, int* reg, int* half) {
    *lane = (row & 7) * 4 + (k & 3);
    *reg = (row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0);
    *half = 0;
  };
  auto b_at = [](int k, int col, int* lane, int* reg, int* half) {
    *lane = col * 4 + (k & 3);
    *reg = 4 + (k >= 4 ? 1 : 0);
    *half = 0;
  };
  mma_tile<8>(ins, outs, decode, a_at, b_at);
}
EMU_FN void mma(WarpCombine combine, float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                uint32_t b1) {
  Cta& ct = cta();
  if (ct.warps[ct.cur->linear >> 5].bar.expected != 32) fail("mma.sync in a partial warp");
  MmaIn in{{a0, a1, a2, a3, b0, b1}, {c[0], c[1], c[2], c[3]}};
  float d[4];
  warp_collective(&in, sizeof(in), d, sizeof(d), combine, nullptr);
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}
}  // namespace

EMU_FN void mma_m16n8k16(MmaType type, float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                         uint32_t b1) {
  mma(type == MmaType::F16 ? &mma16_combine<MmaType::F16> : &mma16_combine<MmaType::BF16>, c, a0, a1, a2, a3, b0, b1);
}

EMU_FN void mma_m16n8k8_tf32(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                             uint32_t b1) {
  mma(&mma8_tf32_combine, c, a0, a1, a2, a3, b0, b1);
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, keeping 10 mantissa bits (the low 13 bits zero);
// NaN and infinities unchanged. A finite value that rounds past the largest tf32 becomes infinity, as on the GPU.
uint32_t cvt_rna_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;
  return (u + 0x1000u) & 0xffffe000u;
}

// cp.async: deferred to the wait (instrumented, so TSan sees the copy as this thread's accesses at the wait).
void cp_async16(void* dst, const void* src) {
  Cta& c = cta();
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) {
    fail("cp.async of 16 bytes with a misaligned address");
  }
  const unsigned char* d = static_cast<const unsigned char*>(dst);
  if (d < c.smem || d + 16 > c.smem + c.grid->smem) fail("cp.async destination outside this CTA's shared memory");
  c.cur->async.emplace_back(dst, src);
}

void cp_async_wait_all() {
  Cta& c = cta();
  for (const auto& [dst, src] : c.cur->async) std::memcpy(dst, src, 16);
  c.cur->async.clear();
}

// Instrumented (not EMU_FN): ThreadSanitizer sees these as the atomics they are, and derives happens-before only
// from a release store read by an acquire load -- a relaxed poll orders nothing, as on the GPU.
unsigned ld_acquire(const unsigned* p) {
  const unsigned v = std::atomic_ref<unsigned>(*const_cast<unsigned*>(p)).load(std::memory_order_acquire);
  yield_spin();
  return v;
}

unsigned ld_relaxed(const unsigned* p) {
  const unsigned v = std::atomic_ref<unsigned>(*const_cast<unsigned*>(p)).load(std::memory_order_relaxed);
  yield_spin();
  return v;
}

void st_release(unsigned* p, unsigned v) {
  std::atomic_ref<unsigned>(*p).store(v, std::memory_order_release);
  note_progress();
}

namespace detail {
void ballot_combine(const unsigned char (*ins)[64], unsigned char (*outs)[64], int lanes, const void*) {
  unsigned m = 0;
  for (int l = 0; l < lanes; ++l) {
    int p;
    std::memcpy(&p, ins[l], sizeof(p));
    m |= (p != 0 ? 1u : 0u) << l;
  }
  for (int l = 0; l < lanes; ++l) std::memcpy(outs[l], &m, sizeof(m));
}
void sum_combine(const unsigned char (*ins)[64], unsigned char (*outs)[64], int lanes, const void*) {
  int s = 0;
  for (int l = 0; l < lanes; ++l) {
    int v;
    std::memcpy(&v, ins[l], sizeof(v));
    s += v;
  }
  for (int l = 0; l < lanes; ++l) std::memcpy(outs[l], &s, sizeof(s));
}
}  // namespace detail

}  // namespace emu

// ---------------------------------------------------------------------------------------------------
// The CUDA runtime calls of the kernels' host code (and of tests/emu, bench/emu_conformance.cu), answered as an
// H100 would. Linked with -Wl,-Bsymbolic so that these, not the libcudart that torch loads, are called.
// ---------------------------------------------------------------------------------------------------
extern "C" {

EMU_FN cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::t_last_error;
  emu::t_last_error = cudaSuccess;
  return e;
}

EMU_FN cudaError_t cudaPeekAtLastError(void) { return emu::t_last_error; }

EMU_FN const char* cudaGetErrorString(cudaError_t error) { return emu::error_message(error); }

EMU_FN cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> lock(emu::g_attr_mu);
  emu::FuncAttrs& a = emu::g_attrs[func];
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > emu::kSmemPerBlockOptin) {
      return emu::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                                       " bytes of dynamic shared memory, over the 227 KB of an H100");
    }
    a.max_dynamic_smem = value;
  } else if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed) {
    a.non_portable_cluster = value != 0;
  }
  return cudaSuccess;
}

EMU_FN cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device > 0) return emu::set_error(cudaErrorInvalidDevice, "cuda-emu has one device, 0 (CPU tensors: -1)");
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::kSmCount; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::kSmemPerBlockOptin; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = emu::kSmemPerSm; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrCooperativeLaunch: *value = 1; break;
    case cudaDevAttrClusterLaunch: *value = 1; break;
    default: return emu::set_error(cudaErrorInvalidValue, "cuda-emu: device attribute " + std::to_string(attr) + " not emulated");
  }
  return cudaSuccess;
}

EMU_FN cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp* prop, int device) {
  if (device > 0) return emu::set_error(cudaErrorInvalidDevice, "cuda-emu has one device, 0 (CPU tensors: -1)");
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof(prop->name), "cuda-emu (H100 limits)");
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = emu::kSmCount;
  prop->sharedMemPerBlock = 48 * 1024;
  prop->sharedMemPerBlockOptin = emu::kSmemPerBlockOptin;
  prop->sharedMemPerMultiprocessor = emu::kSmemPerSm;
  prop->reservedSharedMemPerBlock = emu::kReservedSmemPerBlock;
  prop->regsPerBlock = 65536;
  prop->regsPerMultiprocessor = 65536;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsPerMultiProcessor = emu::kMaxThreadsPerSm;
  prop->cooperativeLaunch = 1;
  return cudaSuccess;
}

EMU_FN cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* numBlocks, const void* func,
                                                                         int blockSize, size_t dynamicSMemSize,
                                                                         unsigned int) {
  const emu::FuncAttrs a = emu::attrs_of(func);
  *numBlocks = dynamicSMemSize > static_cast<size_t>(a.max_dynamic_smem) ? 0 : emu::blocks_per_sm(blockSize, dynamicSMemSize);
  return cudaSuccess;
}

EMU_FN cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* numBlocks, const void* func, int blockSize,
                                                                size_t dynamicSMemSize) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(numBlocks, func, blockSize, dynamicSMemSize, 0);
}

EMU_FN cudaError_t cudaOccupancyMaxActiveClusters(int* numClusters, const void* func, const cudaLaunchConfig_t* cfg) {
  int cluster = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      cluster = static_cast<int>(cfg->attrs[i].val.clusterDim.x * cfg->attrs[i].val.clusterDim.y * cfg->attrs[i].val.clusterDim.z);
    }
  }
  const emu::FuncAttrs a = emu::attrs_of(func);
  if (cluster > emu::kMaxCluster || (cluster > emu::kMaxPortableCluster && !a.non_portable_cluster)) {
    return emu::set_error(cudaErrorInvalidClusterSize, "cudaOccupancyMaxActiveClusters: a cluster of " + std::to_string(cluster) +
                                                           " CTAs (over 8 needs cudaFuncAttributeNonPortableClusterSizeAllowed)");
  }
  const int threads = static_cast<int>(cfg->blockDim.x * cfg->blockDim.y * cfg->blockDim.z);
  const bool fits = cfg->dynamicSmemBytes <= static_cast<size_t>(a.max_dynamic_smem) &&
                    emu::blocks_per_sm(threads, cfg->dynamicSmemBytes) > 0;
  *numClusters = fits ? emu::kSmCount / cluster : 0;
  return cudaSuccess;
}

// Memory: the "device" is host memory (tests/emu and bench/emu_conformance.cu allocate through these).
EMU_FN cudaError_t cudaMalloc(void** ptr, size_t size) {
  // exactly `size` bytes (256-aligned like cudaMalloc's), so that AddressSanitizer sees the first byte past the end
  return posix_memalign(ptr, 256, size > 0 ? size : 1) == 0 ? cudaSuccess : cudaErrorMemoryAllocation;
}
EMU_FN cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}
EMU_FN cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, enum cudaMemcpyKind) {
  std::memmove(dst, src, count);
  return cudaSuccess;
}
EMU_FN cudaError_t cudaMemset(void* ptr, int value, size_t count) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}
EMU_FN cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

}  // extern "C"
