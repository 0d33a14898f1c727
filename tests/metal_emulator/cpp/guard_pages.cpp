// See guard_pages.h.
#include "guard_pages.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "scheduler.h"

namespace emu {
namespace {

struct Region {
  uintptr_t first_page, block, data, end, guard;  // the buffer is [data, end)
  const char* kind;
  const char* name;
};

std::vector<Region> g_regions;
std::size_t g_page = 4096;

void report(const char* text) {
  ssize_t ignored = write(2, text, __builtin_strlen(text));
  (void)ignored;
  _exit(4);
}

void on_fault(int, siginfo_t* info, void* context) {
  auto address = reinterpret_cast<uintptr_t>(info->si_addr);
  bool writing = static_cast<ucontext_t*>(context)->uc_mcontext.gregs[REG_ERR] & 2;
  static char text[512];
  for (const Region& r : g_regions) {
    if (address >= r.guard && address < r.guard + g_page) {
      std::snprintf(text, sizeof text, "metal-emulator: the kernel %s past the end of %s `%s`: byte %zu after its %zu bytes\n",
                    writing ? "wrote" : "read", r.kind, r.name, std::size_t(address - r.end), std::size_t(r.end - r.data));
      report(text);
    }
    if (address >= r.first_page && address < r.guard && writing) {
      std::snprintf(text, sizeof text, "metal-emulator: the kernel wrote into %s `%s`, which is const\n", r.kind, r.name);
      report(text);
    }
  }
  std::snprintf(text, sizeof text, "metal-emulator: the kernel %s an invalid address (%p), outside every buffer\n",
                writing ? "wrote to" : "read from", info->si_addr);
  report(text);
}

}  // namespace

unsigned char* guarded_block(std::size_t front, std::size_t bytes, std::size_t back, const char* kind,
                             const char* name) {
  g_page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  std::size_t total = front + bytes + back, padded = (total + 15) / 16 * 16;
  std::size_t pages = (padded + g_page - 1) / g_page;
  void* mapping = mmap(nullptr, (pages + 1) * g_page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) die("cannot map %zu bytes for %s `%s`", bytes, kind, name);
  auto first_page = reinterpret_cast<uintptr_t>(mapping);
  uintptr_t guard = first_page + pages * g_page;
  mprotect(reinterpret_cast<void*>(guard), g_page, PROT_NONE);
  uintptr_t block = guard - padded;
  for (uintptr_t p = block + total; p < guard; ++p) *reinterpret_cast<unsigned char*>(p) = 0xFF;  // slack reads as NaN
  g_regions.push_back(Region{first_page, block, block + front, block + front + bytes, guard, kind, name});
  return reinterpret_cast<unsigned char*>(block);
}

void make_read_only(const unsigned char* block) {
  for (const Region& r : g_regions)
    if (r.block == reinterpret_cast<uintptr_t>(block))
      mprotect(reinterpret_cast<void*>(r.first_page), r.guard - r.first_page, PROT_READ);
}

void install_fault_handler() {
  struct sigaction action {};
  action.sa_sigaction = on_fault;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, nullptr);
  sigaction(SIGBUS, &action, nullptr);
}

}  // namespace emu
