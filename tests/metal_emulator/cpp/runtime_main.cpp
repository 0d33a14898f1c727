// One kernel dispatch as a process: read the job the Python side wrote, lay out
// the buffers (outputs between canaries), run the threadgroups one after
// another, check the canaries and write the outputs back.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "guard_pages.h"
#include "sanitizer_hooks.h"
#include "scheduler.h"

namespace {

constexpr std::size_t kFrontCanary = 64;  // keeps the output 16-byte aligned
constexpr std::size_t kBackCanary = 256;

struct Buffer {
  bool output = false;
  std::string name;
  std::size_t nbytes = 0, data_offset = 0, pointer_offset = 0;
  unsigned char* block = nullptr;  // what malloc returned
  unsigned char* data = nullptr;   // what the kernel's pointer points at
};

struct Job {
  bool threaded = false, reverse_threads = false, reverse_groups = false;
  unsigned grid[3] = {1, 1, 1}, group[3] = {1, 1, 1};
  std::vector<Buffer> buffers;
};

unsigned char canary_byte(std::size_t i) { return static_cast<unsigned char>(0xA5 + 7 * i); }

std::vector<unsigned char> read_file(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) emu::die("cannot read %s", path);
  return std::vector<unsigned char>(std::istreambuf_iterator<char>(in), {});
}

Job read_job(const char* path) {
  std::ifstream in(path);
  if (!in) emu::die("cannot read %s", path);
  Job job;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::string key;
    words >> key;
    if (key == "threaded") words >> job.threaded;
    else if (key == "reverse_threads") words >> job.reverse_threads;
    else if (key == "reverse_groups") words >> job.reverse_groups;
    else if (key == "grid") words >> job.grid[0] >> job.grid[1] >> job.grid[2];
    else if (key == "threadgroup") words >> job.group[0] >> job.group[1] >> job.group[2];
    else if (key == "buffer") {
      Buffer b;
      std::string kind;
      words >> kind >> b.name >> b.nbytes >> b.data_offset >> b.pointer_offset;
      b.output = kind == "output";
      job.buffers.push_back(b);
    } else if (!key.empty()) {
      emu::die("unknown job line: %s", line.c_str());
    }
    if (!words && !key.empty()) emu::die("bad job line: %s", line.c_str());
  }
  return job;
}

// Plain builds put every buffer before a guard page; sanitizer builds use
// malloc, where ASan gives inputs exactly their bytes.
void lay_out(Job& job, const std::vector<unsigned char>& data) {
  bool guarded = !emu::under_asan() && !emu::under_tsan();
  if (guarded) emu::install_fault_handler();
  for (Buffer& b : job.buffers) {
    if (b.data_offset + b.nbytes > data.size()) emu::die("buffer %s is outside the data file", b.name.c_str());
    std::size_t front = b.output ? kFrontCanary : 0, back = b.output ? kBackCanary : 0;
    std::size_t total = front + b.nbytes + back;
    const char* kind = b.output ? "output" : "input";
    b.block = guarded ? emu::guarded_block(front, b.nbytes, back, kind, b.name.c_str())
                      : static_cast<unsigned char*>(std::malloc(total + (total == 0)));
    b.data = b.block + front;
    std::memcpy(b.data, data.data() + b.data_offset, b.nbytes);
    for (std::size_t i = 0; i < front; ++i) b.block[i] = canary_byte(i);
    for (std::size_t i = 0; i < back; ++i) b.data[b.nbytes + i] = canary_byte(i);
    if (guarded && !b.output) emu::make_read_only(b.block);
    // Lets the Python side name the buffer an ASan report is about.
    if (emu::under_asan())
      std::fprintf(stderr, "metal-emulator-buffer %s %s %p\n", kind, b.name.c_str(), static_cast<void*>(b.block));
  }
}

void check_canaries(const Job& job) {
  for (const Buffer& b : job.buffers) {
    if (!b.output) continue;
    for (std::size_t i = 0; i < kBackCanary; ++i)
      if (b.data[b.nbytes + i] != canary_byte(i))
        emu::die("the kernel wrote past the end of output `%s`: byte %zu after its %zu bytes", b.name.c_str(), i,
                 b.nbytes);
    for (std::size_t i = 0; i < kFrontCanary; ++i)
      if (b.block[i] != canary_byte(i))
        emu::die("the kernel wrote before the start of output `%s`: byte %zu before it", b.name.c_str(),
                 kFrontCanary - i);
  }
}

unsigned ceil_div(unsigned a, unsigned b) { return (a + b - 1) / b; }

// The attribute values of every thread of group (gx, gy, gz), MSL semantics
// for partial edge groups: threads_per_threadgroup is the group's real size,
// dispatch_threads_per_threadgroup the requested one.
unsigned group_threads(const Job& job, const unsigned position[3], std::vector<emu::ThreadIds>& threads) {
  unsigned size[3], groups[3];
  for (int d = 0; d < 3; ++d) {
    size[d] = std::min(job.group[d], job.grid[d] - position[d] * job.group[d]);
    groups[d] = ceil_div(job.grid[d], job.group[d]);
  }
  unsigned count = size[0] * size[1] * size[2];
  unsigned full = job.group[0] * job.group[1] * job.group[2];
  for (unsigned i = 0; i < count; ++i) {
    emu::ThreadIds& t = threads[i];
    std::memset(&t, 0, sizeof t);
    unsigned local[3] = {i % size[0], i / size[0] % size[1], i / (size[0] * size[1])};
    for (int d = 0; d < 3; ++d) {
      t.dispatch_threads_per_threadgroup[d] = job.group[d];
      t.grid_size[d] = t.threads_per_grid[d] = job.grid[d];
      t.thread_position_in_threadgroup[d] = local[d];
      t.thread_position_in_grid[d] = position[d] * job.group[d] + local[d];
      t.threadgroup_position_in_grid[d] = position[d];
      t.threadgroups_per_grid[d] = groups[d];
      t.threads_per_threadgroup[d] = size[d];
    }
    t.dispatch_quadgroups_per_threadgroup = ceil_div(full, 4);
    t.dispatch_simdgroups_per_threadgroup = ceil_div(full, emu::kSimdWidth);
    t.quadgroup_index_in_threadgroup = i / 4;
    t.quadgroups_per_threadgroup = ceil_div(count, 4);
    t.simdgroup_index_in_threadgroup = i / emu::kSimdWidth;
    t.simdgroups_per_threadgroup = ceil_div(count, emu::kSimdWidth);
    t.thread_execution_width = t.threads_per_simdgroup = emu::kSimdWidth;
    t.thread_index_in_quadgroup = i % 4;
    t.thread_index_in_simdgroup = i % emu::kSimdWidth;
    t.thread_index_in_threadgroup = i;
  }
  return count;
}

void dispatch(const Job& job, void* const* pointers) {
  unsigned groups[3], total = 1;
  for (int d = 0; d < 3; ++d) {
    groups[d] = job.grid[d] == 0 ? 0 : ceil_div(job.grid[d], job.group[d]);
    total *= groups[d];
  }
  unsigned full = job.group[0] * job.group[1] * job.group[2];
  std::vector<emu::ThreadIds> threads(full);  // before the scheduler starts its threads
  emu::scheduler_start(full, job.threaded, job.reverse_threads);
  for (unsigned k = 0; k < total; ++k) {
    unsigned g = job.reverse_groups ? total - 1 - k : k;
    unsigned position[3] = {g % groups[0], g / groups[0] % groups[1], g / (groups[0] * groups[1])};
    unsigned count = group_threads(job, position, threads);
    emu::scheduler_run_group(threads.data(), count, pointers);
  }
  emu::scheduler_stop();
}

void write_outputs(const Job& job, const char* path) {
  std::FILE* out = std::fopen(path, "wb");
  if (!out) emu::die("cannot write %s", path);
  for (const Buffer& b : job.buffers)
    if (b.output && std::fwrite(b.data, 1, b.nbytes, out) != b.nbytes) emu::die("cannot write %s", path);
  if (std::fclose(out) != 0) emu::die("cannot write %s", path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) emu::die("usage: %s JOB DATA OUT", argv[0]);
  Job job = read_job(argv[1]);
  lay_out(job, read_file(argv[2]));
  std::vector<void*> pointers;
  for (Buffer& b : job.buffers) pointers.push_back(b.data + b.pointer_offset);
  dispatch(job, pointers.data());
  check_canaries(job);
  write_outputs(job, argv[3]);
  return 0;
}
