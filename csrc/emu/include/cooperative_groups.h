// The cooperative_groups subset the kernels use, for the emulated build (csrc/emu/cuda_emu.h): thread-block
// clusters, their barrier and distributed shared memory. On the include path of the emulated build only.
#pragma once

#include "emu/cuda_emu.h"

namespace cooperative_groups {

struct cluster_group {
  void sync() const { ::emu::cluster_sync(); }
  // The address of *p's counterpart in the dynamic shared memory of CTA `rank` of this cluster.
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return reinterpret_cast<T*>(::emu::map_shared_rank(p, rank));
  }
  unsigned block_rank() const { return ::emu::cluster_rank(); }
  unsigned num_blocks() const { return ::emu::cluster_size(); }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
