// The CPU copy path's thread pool.
#pragma once

namespace dynkv {

// Pool size: DYNKV_CPU_THREADS, else the hardware threads capped at 8.
int max_cpu_threads();

}  // namespace dynkv
