// Stand-in for CUDA's <cuda_pipeline_primitives.h> in the CPU emulation (see ../cuda_emu.h): the
// cp.async primitives as synchronous copies. The data lands when the copy is issued, so a kernel
// that reads the destination before __pipeline_wait_prior and a barrier is not caught here (a GPU
// and racecheck would be needed); what is checked is that the copies go where the kernel reads
// them, aligned as cp.async requires.
#pragma once
#include "../cuda_emu.h"

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, size_t size_and_align,
                                    size_t zfill = 0) {
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16) std::abort();
  if (zfill > size_and_align) std::abort();
  if (reinterpret_cast<std::uintptr_t>(dst_shared) % size_and_align != 0 ||
      reinterpret_cast<std::uintptr_t>(src_global) % size_and_align != 0)
    std::abort();  // cp.async needs both addresses aligned to the copy size
  std::memcpy(dst_shared, src_global, size_and_align - zfill);
  std::memset(static_cast<char*>(dst_shared) + (size_and_align - zfill), 0, zfill);
}
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}
