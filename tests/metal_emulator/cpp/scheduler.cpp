// The baton scheduler. Every GPU thread of a group gets an OS thread, but only
// the holder of the baton runs; it hands the baton on when it waits (barrier,
// simd function) or returns. So runs are deterministic: the same kernel and
// inputs always interleave the same way, and a missing barrier shows up every
// time, not sometimes. The hand-offs are futex posts that TSan does not see;
// Metal's own happens-before edges are reported to it explicitly.
#include "scheduler.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "sanitizer_hooks.h"

namespace emu {

void die(const char* format, ...) {
  va_list args;
  va_start(args, format);
  std::fputs("metal-emulator: ", stderr);
  std::vfprintf(stderr, format, args);
  std::fputc('\n', stderr);
  va_end(args);
  std::fflush(stderr);
  _exit(3);
}

namespace {

// A binary semaphore on a futex (no pthread objects, which TSan would see).
struct Wake {
  std::atomic<uint32_t> posted{0};
  void post() {
    posted.store(1, std::memory_order_release);
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&posted), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
  }
  void wait() {
    while (posted.exchange(0, std::memory_order_acquire) == 0)
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&posted), FUTEX_WAIT_PRIVATE, 0, nullptr, nullptr, 0);
  }
};

enum class State { Runnable, AtBarrier, AtSimd, Done };

struct Lane {
  unsigned index = 0;  // thread_index_in_threadgroup
  State state = State::Done;
  Site site{};
  const char* op = "";
  const ThreadIds* ids = nullptr;
  Wake wake;
  pthread_t os_thread{};
};

struct Simdgroup {
  unsigned live = 0, arrived = 0, generation = 0;
  uint32_t arrived_mask = 0, result_mask[2] = {0, 0};
  Site site{};
  const char* op = "";
  // Double-buffered: a lane that runs ahead writes the other buffer while
  // slower lanes still read this one.
  unsigned char slots[2][kSimdWidth][kSimdSlotBytes];
};

struct TgEntry {
  Site site;
  std::size_t offset, size;
};

constexpr std::size_t kTgLimit = 32768;       // Apple GPUs: 32 KiB per threadgroup
constexpr std::size_t kTgRedzone = 64;        // between declarations, poisoned under ASan
constexpr std::size_t kArenaBytes = kTgLimit + 128 * kTgRedzone;
constexpr unsigned kSyncSlots = 256;          // TSan sync addresses per barrier / simdgroup

bool g_threaded = false, g_reverse = false, g_stopping = false;
std::vector<Lane*> g_lanes;  // one per OS thread of the pool
unsigned g_count = 0;        // threads in the current group
unsigned g_live = 0;
void* const* g_buffers = nullptr;
Wake g_main_wake;
thread_local Lane* t_lane = nullptr;

unsigned g_barrier_arrived = 0, g_barrier_generation = 0;
Site g_barrier_site{};
Simdgroup* g_simdgroups = nullptr;  // in the group region, after the arena
unsigned g_simdgroup_count = 0;

// The group region: threadgroup memory, then the simd exchange slots. Under
// TSan it is mapped afresh for each group, which drops the previous group's
// accesses (AnnotateNewMemory does not, in GCC 12's TSan).
unsigned char* g_region = nullptr;
std::size_t g_region_bytes = 0;
unsigned char* g_arena = nullptr;
std::vector<TgEntry> g_tg_entries;
std::size_t g_tg_cursor = 0, g_tg_bytes = 0;

// TSan sync objects for barriers and simd calls, fresh per group so that they
// link no two groups.
unsigned char* g_sync = nullptr;

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && a.column == b.column && std::strcmp(a.file, b.file) == 0;
}

std::string where(const Site& s) {
  return std::string(s.file) + ":" + std::to_string(s.line) + ":" + std::to_string(s.column);
}

void* barrier_sync(unsigned generation) { return g_sync + generation % kSyncSlots; }
void* simd_sync(unsigned simdgroup, unsigned generation) {
  return g_sync + kSyncSlots * (1 + simdgroup) + generation % kSyncSlots;
}

std::string describe(const Lane& lane) {
  switch (lane.state) {
    case State::Runnable: return "running";
    case State::Done: return "returned";
    case State::AtBarrier: return "wait at threadgroup_barrier (" + where(lane.site) + ")";
    case State::AtSimd: return std::string("wait in ") + lane.op + " (" + where(lane.site) + ")";
  }
  return "";
}

// "threads 0-31 wait in simd_sum (...); threads 32-63 wait at ..."
[[noreturn]] void die_deadlocked() {
  std::string report;
  unsigned first = 0;
  for (unsigned i = 1; i <= g_count; ++i) {
    if (i < g_count && describe(*g_lanes[i]) == describe(*g_lanes[first])) continue;
    if (g_lanes[first]->state != State::Done) {
      if (!report.empty()) report += "; ";
      report += "threads " + std::to_string(first) + (i - 1 > first ? "-" + std::to_string(i - 1) : "");
      report += " " + describe(*g_lanes[first]);
    }
    first = i;
  }
  die("deadlock: %s (a barrier or simd function in divergent control flow?)", report.c_str());
}

// Next runnable lane after `from` in baton order, `from` itself last.
Lane* next_runnable(unsigned from) {
  for (unsigned step = 1; step <= g_count; ++step) {
    unsigned j = g_reverse ? (from + g_count - step) % g_count : (from + step) % g_count;
    if (g_lanes[j]->state == State::Runnable) return g_lanes[j];
  }
  return nullptr;
}

// The caller has just stopped running; give the baton to the next lane and
// wait for it to come back (unless the caller is still the only runnable one).
void hand_on(Lane& self) {
  Lane* next = next_runnable(self.index);
  if (next == nullptr) {
    if (g_live == 0) {
      g_main_wake.post();
      return;
    }
    die_deadlocked();
  }
  if (next == &self) return;
  // Decide before posting: once `next` runs, a finished group may already be
  // followed by the next one, which resets this lane's state.
  bool finished = self.state == State::Done;
  next->wake.post();
  if (!finished) self.wake.wait();
}

void release_barrier_if_complete() {
  if (g_barrier_arrived == 0 || g_barrier_arrived != g_live) return;
  for (unsigned i = 0; i < g_count; ++i)
    if (g_lanes[i]->state == State::AtBarrier) g_lanes[i]->state = State::Runnable;
  g_barrier_arrived = 0;
  ++g_barrier_generation;
}

void complete_simd_if_ready(unsigned s) {
  Simdgroup& sg = g_simdgroups[s];
  if (sg.arrived == 0 || sg.arrived != sg.live) return;
  sg.result_mask[sg.generation & 1] = sg.arrived_mask;
  for (unsigned i = s * kSimdWidth; i < g_count && i < (s + 1) * kSimdWidth; ++i)
    if (g_lanes[i]->state == State::AtSimd) g_lanes[i]->state = State::Runnable;
  sg.arrived = 0;
  sg.arrived_mask = 0;
  ++sg.generation;
}

void run_lane(Lane& lane) {
  t_lane = &lane;
  if (g_threaded) tsan_acquire(&g_main_wake);
  emu_kernel_entry(g_buffers, lane.ids);
  lane.state = State::Done;
  --g_live;
  release_barrier_if_complete();
  if (g_threaded) {
    unsigned s = lane.index / kSimdWidth;
    --g_simdgroups[s].live;
    complete_simd_if_ready(s);
  }
}

void* worker_main(void* arg) {
  Lane& lane = *static_cast<Lane*>(arg);
  for (;;) {
    lane.wake.wait();
    if (g_stopping) return nullptr;
    run_lane(lane);
    hand_on(lane);
  }
}

unsigned char* map_region(void* at) {
  void* p = mmap(at, g_region_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | (at ? MAP_FIXED : 0), -1, 0);
  if (p == MAP_FAILED) die("cannot map %zu bytes of group memory", g_region_bytes);
  return static_cast<unsigned char*>(p);
}

void reset_group_memory() {
  if (under_tsan()) {
    munmap(g_region, g_region_bytes);
    map_region(g_region);
  }
  asan_unpoison(g_arena, kArenaBytes);
  std::memset(g_arena, 0xFF, kArenaBytes);  // reads as NaN for every float type
  asan_poison(g_arena, kArenaBytes);
  g_tg_entries.clear();
  g_tg_cursor = 0;
  g_tg_bytes = 0;
}

}  // namespace

void scheduler_start(unsigned max_threads, bool threaded, bool reverse) {
  g_threaded = threaded;
  g_reverse = reverse;
  // Everything the lanes touch is allocated before they start, so TSan sees
  // thread creation order it after the allocation.
  unsigned simdgroups = (max_threads + kSimdWidth - 1) / kSimdWidth;
  g_region_bytes = kArenaBytes + simdgroups * sizeof(Simdgroup);
  g_region = map_region(nullptr);
  g_arena = g_region;
  g_simdgroups = reinterpret_cast<Simdgroup*>(g_region + kArenaBytes);
  unsigned pool = threaded ? max_threads : 1;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 2u << 20);
  for (unsigned i = 0; i < pool; ++i) {
    Lane* lane = new Lane;
    lane->index = i;
    g_lanes.push_back(lane);
    if (threaded && pthread_create(&lane->os_thread, &attr, worker_main, lane) != 0)
      die("could not start OS thread %u of %u", i, pool);
  }
  pthread_attr_destroy(&attr);
}

void scheduler_run_group(const ThreadIds* threads, unsigned count, void* const* buffers) {
  g_count = count;
  g_live = g_count;
  g_buffers = buffers;
  reset_group_memory();
  if (!g_threaded) {
    for (unsigned k = 0; k < g_count; ++k) {
      Lane& lane = *g_lanes[0];
      lane.index = g_reverse ? g_count - 1 - k : k;
      lane.ids = &threads[lane.index];
      lane.state = State::Runnable;
      run_lane(lane);
    }
    return;
  }
  g_barrier_arrived = 0;
  g_barrier_generation = 0;
  g_simdgroup_count = (g_count + kSimdWidth - 1) / kSimdWidth;
  for (unsigned s = 0; s < g_simdgroup_count; ++s) {
    new (&g_simdgroups[s]) Simdgroup;
    g_simdgroups[s].live = std::min(kSimdWidth, g_count - s * kSimdWidth);
  }
  // Never freed: a reused address would carry one group's releases into the next.
  if (under_tsan()) g_sync = static_cast<unsigned char*>(std::malloc(kSyncSlots * (1 + g_simdgroup_count)));
  for (unsigned i = 0; i < g_count; ++i) {
    g_lanes[i]->ids = &threads[i];
    g_lanes[i]->state = State::Runnable;
  }
  for (unsigned i = g_count; i < g_lanes.size(); ++i) g_lanes[i]->state = State::Done;
  tsan_release(&g_main_wake);  // what the main thread set up for this group
  g_lanes[g_reverse ? g_count - 1 : 0]->wake.post();
  g_main_wake.wait();
}

void scheduler_stop() {
  if (!g_threaded) return;
  g_stopping = true;
  for (Lane* lane : g_lanes) {
    lane->wake.post();
    pthread_join(lane->os_thread, nullptr);
  }
}

void threadgroup_barrier(Site site) {
  if (!g_threaded) die("%s: threadgroup_barrier in a kernel run serially", where(site).c_str());
  Lane& lane = *t_lane;
  if (g_barrier_arrived == 0) {
    g_barrier_site = site;
  } else if (!same_site(site, g_barrier_site)) {
    die("threadgroup_barrier reached at different places by one group: %s and %s (thread %u)",
        where(g_barrier_site).c_str(), where(site).c_str(), lane.index);
  }
  unsigned generation = g_barrier_generation;
  tsan_release(barrier_sync(generation));
  lane.state = State::AtBarrier;
  lane.site = site;
  ++g_barrier_arrived;
  release_barrier_if_complete();
  hand_on(lane);
  tsan_acquire(barrier_sync(generation));
}

SimdLanes simd_exchange(const void* value, unsigned size, const char* op, Site site) {
  if (!g_threaded) die("%s: %s in a kernel run serially", where(site).c_str(), op);
  if (size > kSimdSlotBytes) die("%s: %s on a %u-byte value (at most %u)", where(site).c_str(), op, size, kSimdSlotBytes);
  Lane& lane = *t_lane;
  unsigned s = lane.index / kSimdWidth, lane_in_sg = lane.index % kSimdWidth;
  Simdgroup& sg = g_simdgroups[s];
  unsigned generation = sg.generation, buffer = generation & 1;
  if (sg.arrived == 0) {
    sg.site = site;
    sg.op = op;
    std::memset(sg.slots[buffer], 0xFF, sizeof sg.slots[buffer]);  // absent lanes read as NaN
  } else if (!same_site(site, sg.site) || std::strcmp(op, sg.op) != 0) {
    die("lanes of simdgroup %u called simd functions at different places: %s (%s) and %s (%s, lane %u); "
        "divergent simd calls are not emulated", s, sg.op, where(sg.site).c_str(), op, where(site).c_str(), lane_in_sg);
  }
  std::memcpy(sg.slots[buffer][lane_in_sg], value, size);
  sg.arrived_mask |= 1u << lane_in_sg;
  ++sg.arrived;
  tsan_release(simd_sync(s, generation));
  lane.state = State::AtSimd;
  lane.site = site;
  lane.op = op;
  complete_simd_if_ready(s);
  hand_on(lane);
  tsan_acquire(simd_sync(s, generation));
  return SimdLanes{&sg.slots[buffer][0][0], sg.result_mask[buffer], lane_in_sg};
}

void* threadgroup_memory(std::size_t size, std::size_t align, Site site) {
  for (const TgEntry& e : g_tg_entries)
    if (same_site(e.site, site)) return g_arena + e.offset;
  if (align < 16) align = 16;
  g_tg_bytes = (g_tg_bytes + align - 1) / align * align + size;
  if (g_tg_bytes > kTgLimit)
    die("%s: threadgroup memory of %zu bytes is over the 32 KiB limit", where(site).c_str(), g_tg_bytes);
  std::size_t offset = (g_tg_cursor + align - 1) / align * align;
  if (offset + size + kTgRedzone > kArenaBytes) die("%s: too many threadgroup declarations", where(site).c_str());
  g_tg_cursor = offset + size + (under_asan() ? kTgRedzone : 0);
  g_tg_entries.push_back(TgEntry{site, offset, size});
  asan_unpoison(g_arena + offset, size);
  return g_arena + offset;
}

void fail(const char* message, Site site) { die("%s: %s", where(site).c_str(), message); }

}  // namespace emu
