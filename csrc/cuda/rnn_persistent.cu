// Persistent path: one launch runs all T steps of a layer, forward or backward, every cell.
//
// Work split. The recurrence is a skinny GEMM per step, out[rows, b] = A[rows, K] @ B[K, b]:
//   forward   A = the G*units rows of W_hh of the hidden units this CTA owns (K = H), B = h_{t-1}^T;
//             the CTA then has every gate of its units and runs the cell locally.
//   backward  A = W_hh[:, units]^T (K = G*H), B = dgates_t^T; the CTA gets dL/dh_{t-1} of its units, which its
//             own pointwise of the next step consumes; only the gate gradients are exchanged.
// A stays in shared memory for the whole launch (loaded once). B is all of h (or of the gate gradients) and
// changes every step: each CTA publishes its slice and waits for everyone else's:
//   grid      slices go to a double-buffered [2, B, K] buffer in global memory (L2); each CTA then release-stores
//             its own step flag; the threads watching producer r stage r's slice of the first chunk into shared
//             memory (cp.async) as soon as r's flag is acquired (cooperative launch: all CTAs are co-resident,
//             the spin cannot hang); further chunks, and plans whose slices are not whole 16-byte pieces, stage
//             whole rows after the last flag;
//   cluster   (sm_90) slices are written straight into every CTA's shared-memory copy of B through distributed
//             shared memory; a split cluster barrier: arrive (release) right after the copies, wait (acquire)
//             just before the next MMA reads them.
// Batch groups: the grid is `groups` sets of `ctas` CTAs, each set running its own batch rows with its own flags
// (or its own cluster), so groups never wait on each other; the grid exchange splits the batch into as many
// groups (of 8+ rows) as the SMs hold, so that each CTA stages and multiplies only its group's rows.
// State: a thread owns the same (batch row, unit) items every step (kPersistentSlots at most), so h and c
// (backward: dL/dh and dL/dc) stay in registers for all T steps; h_n, c_n (grad_h0, grad_c0) are written once. The
// forward's per-item values that wait across the MMA (x_gates in, workspace entries out) sit in shared memory
// (20 bytes per item), which leaves the MMA its registers.
//
// One step, C CTAs per group, b batch rows per group, u units per CTA, e bytes per element (2; fp32: 4), K = H
// forward and G*H backward; "trip" = one L2 round trip:
//   grid      wait: the threads of producer r poll flag r with relaxed loads (LDG.STRONG.GPU: no fence, no L1
//             invalidation), then one acquire load (1 trip, one CCTL.IVALL), then stage r's b*u*e bytes by cp.async
//             (1 trip): early producers' slices load while late ones compute, so of the b*K*e bytes every CTA reads
//             (the aggregate L2 read, the largest term at LSTM fp16 H=768 B=16) only what exceeds the producers'
//             spread stays on the critical path (docs/latency_model.md); MMA + cell; publish: b*u*e bytes
//             of h (gate gradients: b*G*u*e) to L2, bar.sync, one st.release.gpu (MEMBAR.ALL.GPU: waits for those
//             stores only, ~1 trip; no SC fence, no central counter); then, off the critical path while the
//             others catch up, y and the workspace rows (backward: grad_xg / grad_hg) and the next step's
//             x_gates into registers (parked in shared memory once the wait is over). Critical path ~4-5 trips in
//             sequence: h stores acknowledged (the release), flag store reaches L2, a poll returns it, the acquire
//             load, the last slice's load.
//   cluster   MMA + cell; publish: b*u*e bytes of h (b*G*u*e gate gradients) into each of the C CTAs' shared
//             memory (DSMEM), arrive.release (MEMBAR.ALL.GPU over those stores only), the off-path stores and
//             loads as above, wait.acquire. No L2 trip on the critical path.
// MMA: mma.sync m16n8k16 (fp16/bf16) or m16n8k8 (tf32, fp32 inputs), fp32 accumulation. M = gate rows, N = 8
// batch rows, so batch 1..8 costs one n-tile. 8 warps = warps_m x warps_k; warps_k split K and are summed in
// shared memory. Fragment trick: K is a summation index, so any permutation of it applied to both A and B gives
// the same product; each thread loads 8 consecutive K elements of a row (one 16-byte LDS for 16-bit types) and
// feeds them to the MMA slots it owns, instead of the canonical slot order that needs ldmatrix or 4-byte loads.
#include <cooperative_groups.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

#include "cuda/rnn_device.cuh"

namespace cg = cooperative_groups;

namespace fusedrnn::cuda {
namespace {

// Thread-block clusters exist from sm_90 (cooperative_groups declares this_cluster() only there). Below it the
// cluster kernels compile to a trap: the planner never picks them.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 900)
#define FUSEDRNN_CLUSTERS 0
#else
#define FUSEDRNN_CLUSTERS 1
#endif
constexpr bool kNoClusters = !FUSEDRNN_CLUSTERS;

constexpr int kThreads = kPersistentThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kMtPerWarp = 4;       // 16-row m-tiles per warp: 4 x 4 n-tiles x 4 = 64 accumulator registers
constexpr int kMaxChunk = 32;       // batch rows per chunk
constexpr int kNt = kMaxChunk / 8;  // n-tiles per chunk
constexpr int kSlots = kPersistentSlots;  // state items per thread (rnn_kernels.h)
constexpr int kKBlock = 32;         // K elements per thread row load: 8 per lane quad position

// ---------------------------------------------------------------------------------------------------
// Tensor-core MMA on fragments of 8 consecutive K elements per thread (see the file comment).
// ---------------------------------------------------------------------------------------------------
template <typename T>
struct Vec8 {  // 8 elements of T: 16 bytes for 16-bit types, 32 for fp32
  uint4 v[sizeof(T) == 2 ? 1 : 2];
};

template <typename T>
__device__ __forceinline__ Vec8<T> lds8(const unsigned char* p) {
  Vec8<T> r;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(r.v) / sizeof(uint4)); ++i) r.v[i] = reinterpret_cast<const uint4*>(p)[i];
  return r;
}

template <typename T>
__device__ __forceinline__ void mma_k(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                      uint32_t b1);

template <>
__device__ __forceinline__ void mma_k<__half>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
  ptx::mma_m16n8k16_f16(c, a0, a1, a2, a3, b0, b1);
}

template <>
__device__ __forceinline__ void mma_k<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                     uint32_t b0, uint32_t b1) {
  ptx::mma_m16n8k16_bf16(c, a0, a1, a2, a3, b0, b1);
}

template <>
__device__ __forceinline__ void mma_k<float>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
  ptx::mma_m16n8k8_tf32(c, a0, a1, a2, a3, b0, b1);
}

// c += A(rows g, g+8; 8 K elements) B(8 K elements; column g). Each pair of 32-bit words is one K slot pair:
// 16-bit, m16n8k16: A regs {row g, slots 2q..}, {g+8, 2q..}, {g, 2q+8..}, {g+8, 2q+8..}; B {2q..}, {2q+8..};
// tf32, m16n8k8: A {g, q}, {g+8, q}, {g, q+4}, {g+8, q+4}; B {q}, {q+4}. Same word of A and B -> same slot.
template <typename T>
__device__ __forceinline__ void mma_block(float (&c)[4], const Vec8<T>& lo, const Vec8<T>& hi, const Vec8<T>& b) {
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(b.v) / sizeof(uint4)); ++i) {
    mma_k<T>(c, lo.v[i].x, hi.v[i].x, lo.v[i].y, hi.v[i].y, b.v[i].x, b.v[i].y);
    mma_k<T>(c, lo.v[i].z, hi.v[i].z, lo.v[i].w, hi.v[i].w, b.v[i].z, b.v[i].w);
  }
}

// The value an MMA operand holds: the dtype itself, or for fp32 the tf32 rounding (the MMA would truncate).
template <typename T>
__device__ __forceinline__ T mma_operand(float v) {
  return from_f<T>(v);
}
template <>
__device__ __forceinline__ float mma_operand<float>(float v) {
  return __uint_as_float(ptx::cvt_rna_tf32(v));
}

using Acc = float[kMtPerWarp][kNt][4];

// acc[mt][nt] += A[m-tile mt0+mt] B[n-tile nt] over K blocks [kb0, kb1); A, B row-major in shared memory.
template <typename T>
__device__ __forceinline__ void warp_mma(const unsigned char* A, int a_stride, const unsigned char* B, int b_stride,
                                         int mt0, int mt_count, int n_tiles, int kb0, int kb1, Acc& acc) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  constexpr int kBlockBytes = kKBlock * static_cast<int>(sizeof(T));
  const unsigned char* a = A + (mt0 * 16 + g) * a_stride + q * 8 * static_cast<int>(sizeof(T));
  const unsigned char* b = B + g * b_stride + q * 8 * static_cast<int>(sizeof(T));
  // Two K blocks per iteration for 16-bit types (the next block's fragments load under this one's MMAs); one for
  // fp32, whose fragments are twice as wide: unrolled twice, the loop left ptxas too few of the 255 registers for
  // the state the kernels keep across steps, and it spilled (sm_80 forward).
  [[maybe_unused]] constexpr int kUnroll = sizeof(T) == 2 ? 2 : 1;  // (the emulator ignores the pragma)
#pragma unroll kUnroll
  for (int kb = kb0; kb < kb1; ++kb) {
    Vec8<T> bf[kNt];
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
      if (nt < n_tiles) bf[nt] = lds8<T>(b + nt * 8 * b_stride + kb * kBlockBytes);
    }
#pragma unroll
    for (int mt = 0; mt < kMtPerWarp; ++mt) {
      if (mt < mt_count) {
        const Vec8<T> lo = lds8<T>(a + mt * 16 * a_stride + kb * kBlockBytes);
        const Vec8<T> hi = lds8<T>(a + (mt * 16 + 8) * a_stride + kb * kBlockBytes);
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt) {
          if (nt < n_tiles) mma_block<T>(acc[mt][nt], lo, hi, bf[nt]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Synchronisation and data movement
// ---------------------------------------------------------------------------------------------------
// Grid exchange. CTA `rank` owns flags[rank]: the number of epochs it has published (epoch e = the exchange
// buffer e & 1 holding h_{e-1}, or the gate gradients of backward step e; forward epoch 0 is h0). Flags are zeroed
// before the launch and only grow. Publishing: every thread's exchange stores, a __syncthreads, then thread 0's
// release store (cumulative through the bar.sync, so it covers the whole CTA's stores). Waiting: thread r polls
// flags[r] with relaxed loads (L2, no fence, no L1 invalidation), then ONE acquire load, then a __syncthreads
// hands the acquired order to every thread. Co-residency is guaranteed by the cooperative launch, so the spin
// cannot hang.
__device__ __forceinline__ void release_flag(unsigned* flag, unsigned epochs) {
  if (threadIdx.x == 0) ptx::st_release_gpu(flag, epochs);  // after a __syncthreads that follows the stores
}

__device__ __forceinline__ void wait_flags(const unsigned* flags, int ctas, unsigned epochs) {
  if (static_cast<int>(threadIdx.x) < ctas) {  // the planner keeps ctas <= kThreads
    const unsigned* f = flags + threadIdx.x;
    while (ptx::ld_relaxed_gpu(f) < epochs) {
    }
    while (ptx::ld_acquire_gpu(f) < epochs) {  // once: the flag only grows
    }
  }
  __syncthreads();
}

// Grid exchange, the first batch chunk of a step: the wait and the staging in one. Producer r's part of a row is
// `segs` runs of `units` elements at columns seg * seg_stride + r * units; the threads of producer r (kThreads /
// ctas of them) poll its flag, acquire it, and at once stage its runs of the chunk's rows by cp.async. The slices
// of early producers load while late ones are still computing, so after the last flag lands one acquire and one
// slice load remain on the critical path instead of the whole b x K read of h (every CTA's stage together: 2.4 MB,
// ~0.43 us of L2 bandwidth per step at LSTM fp16 H=768 B=16; docs/latency_model.md). Needs units * sizeof(T) a
// multiple of 16 (`slices_stageable`); the columns past every producer's (padding) are never written here, so the
// caller zeroes shared memory once and stage_rows (later chunks) copies the exchange buffer's zeros into them.
template <typename T>
__device__ __forceinline__ bool slices_stageable(int units) {
  return units * static_cast<int>(sizeof(T)) % 16 == 0;
}

template <typename T>
__device__ __forceinline__ void wait_and_stage_slices(const unsigned* flags, int ctas, unsigned epochs, int units,
                                                      int segs, int seg_stride, unsigned char* dst, int b_stride,
                                                      const T* src, int rows, int row_elems) {
  const int per_producer = kThreads / ctas;  // >= 1: the planner keeps ctas <= kThreads
  const int producer = static_cast<int>(threadIdx.x) % ctas, part = static_cast<int>(threadIdx.x) / ctas;
  if (part < per_producer) {
    const unsigned* f = flags + producer;
    while (ptx::ld_relaxed_gpu(f) < epochs) {
    }
    while (ptx::ld_acquire_gpu(f) < epochs) {  // once; then this producer's slice
    }
    const int vecs = units * static_cast<int>(sizeof(T)) / 16, pieces = rows * segs * vecs;
    for (int i = part; i < pieces; i += per_producer) {
      const int v = i % vecs, seg = i / vecs % segs, r = i / (vecs * segs);
      const int col = seg * seg_stride + producer * units;
      ptx::cp_async_cg_16(dst + r * b_stride + col * static_cast<int>(sizeof(T)) + v * 16,
                          reinterpret_cast<const unsigned char*>(src + static_cast<int64_t>(r) * row_elems + col) + v * 16);
    }
  }
  ptx::cp_async_wait_all();
  __syncthreads();
}

// Copies rows [0, rows) of a [*, row_elems] global buffer into shared memory rows of b_stride bytes (through L2
// only: other CTAs wrote it since the last step).
template <typename T>
__device__ __forceinline__ void stage_rows(unsigned char* dst, int b_stride, const T* src, int rows, int row_elems) {
  const int vecs = row_elems * static_cast<int>(sizeof(T)) / 16;
  for (int i = threadIdx.x; i < rows * vecs; i += kThreads) {
    const int r = i / vecs, v = i % vecs;
    ptx::cp_async_cg_16(dst + r * b_stride + v * 16, reinterpret_cast<const unsigned char*>(src + static_cast<int64_t>(r) * row_elems) + v * 16);
  }
  ptx::cp_async_wait_all();
  __syncthreads();
}

// Cluster exchange: copies this CTA's stage [rows][segs][units] into columns seg * seg_stride + j0 .. + units of
// rows [0, rows) of the B buffer `buf` in every CTA of the cluster, itself included, 16 bytes at a time. The
// caller then arrives at the cluster barrier (release) and waits (acquire) before anyone reads `buf`.
template <typename T>
__device__ __forceinline__ void cluster_publish(const T* stage, int rows, int segs, int units, int seg_stride, int j0,
                                               unsigned char* buf, int b_stride, int ctas) {
#if FUSEDRNN_CLUSTERS
  {
    cg::cluster_group cluster = cg::this_cluster();
    const int vecs = units * static_cast<int>(sizeof(T)) / 16;
    const int total = ctas * rows * segs * vecs;
    for (int i = threadIdx.x; i < total; i += kThreads) {
      const int v = i % vecs;
      int rest = i / vecs;
      const int s = rest % segs;
      rest /= segs;
      const int r = rest % rows, rank = rest / rows;
      const uint4 val = reinterpret_cast<const uint4*>(stage + (r * segs + s) * units)[v];
      unsigned char* local = buf + r * b_stride + (s * seg_stride + j0) * static_cast<int>(sizeof(T)) + v * 16;
      *cluster.map_shared_rank(reinterpret_cast<uint4*>(local), rank) = val;
    }
  }
#endif
}

__device__ __forceinline__ void cluster_sync_all() {
  ptx::cluster_arrive_release();
  ptx::cluster_wait_acquire();
}

__device__ __forceinline__ void zero_smem(unsigned char* p, int bytes) {
  for (int i = threadIdx.x; i < bytes / 16; i += kThreads) reinterpret_cast<uint4*>(p)[i] = make_uint4(0, 0, 0, 0);
}

// Writes the warp's accumulators to its slice red[kg][rows_pad][chunk].
__device__ __forceinline__ void store_partials(const Acc& acc, float* red, int rows_pad, int chunk, int kg, int mt0,
                                               int mt_count, int n_tiles) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < kMtPerWarp; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
      if (mt < mt_count && nt < n_tiles) {
        float* r = red + (static_cast<int64_t>(kg) * rows_pad + (mt0 + mt) * 16 + g) * chunk + nt * 8 + 2 * q;
        r[0] = acc[mt][nt][0];
        r[1] = acc[mt][nt][1];
        r[8 * chunk] = acc[mt][nt][2];
        r[8 * chunk + 1] = acc[mt][nt][3];
      }
    }
  }
}

// The state items of one thread: slot i holds item threadIdx.x + i * kThreads of its CTA, item = row * n_units +
// unit over the CTA's batch rows [b_begin, b_end) and units [j0, j0 + n_units), packed row << 16 | unit (kNoItem
// past the CTA's items). The same items every step, in both directions, so the state stays in registers.
constexpr unsigned kNoItem = 0xffffffffu;

struct Slots {
  unsigned item[kSlots];

  __device__ __forceinline__ void init(int n_units, int rows) {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int it = static_cast<int>(threadIdx.x) + i * kThreads;
      item[i] = it < n_units * rows ? static_cast<unsigned>((it / n_units) << 16 | (it % n_units)) : kNoItem;
    }
  }
  __device__ __forceinline__ bool owns(int i) const { return item[i] != kNoItem; }
  __device__ __forceinline__ int row(int i) const { return static_cast<int>(item[i] >> 16); }  // in the CTA's rows
  __device__ __forceinline__ int unit(int i) const { return static_cast<int>(item[i] & 0xffffu); }
  // The slot's row within the chunk of rows [r0, r0 + rows) of the CTA, or -1 outside it (and for no item).
  __device__ __forceinline__ int in_chunk(int i, int r0, int rows) const {
    const unsigned r = (item[i] >> 16) - static_cast<unsigned>(r0);
    return item[i] != kNoItem && r < static_cast<unsigned>(rows) ? static_cast<int>(r) : -1;
  }
};

// Per-CTA geometry shared by both directions.
struct Cta {
  int rank, group, j0, n_units, b_begin, b_end;
  int mt0, mt_count, kg, kb0, kb1;
  unsigned char *sA, *sB;
  float* red;
  void* stage;

  // The grid is `groups` x `ctas` CTAs: consecutive ranks form a group (a cluster on the cluster exchange).
  __device__ __forceinline__ void init(const PersistentPlan& plan, int H, int B, unsigned char* smem) {
    rank = static_cast<int>(blockIdx.x) % plan.ctas;
    group = static_cast<int>(blockIdx.x) / plan.ctas;
    j0 = rank * plan.units;
    n_units = max(0, min(plan.units, H - j0));
    b_begin = group * plan.group_rows;
    b_end = min(B, b_begin + plan.group_rows);
    if (n_units * (b_end - b_begin) > kSlots * kThreads) __trap();  // the planner's limit
    const int warp = threadIdx.x / 32;
    const int mg = warp / plan.warps_k;
    kg = warp % plan.warps_k;
    mt0 = mg * kMtPerWarp;
    mt_count = max(0, min(kMtPerWarp, plan.m_tiles - mt0));
    const int nkb = plan.k_padded / kKBlock;
    kb0 = kg * nkb / plan.warps_k;
    kb1 = (kg + 1) * nkb / plan.warps_k;
    sA = smem;
    sB = smem + plan.smem_a;
    red = reinterpret_cast<float*>(sB + plan.smem_b);
    stage = reinterpret_cast<unsigned char*>(red) + plan.smem_red;
  }

  // (b, j) of slot i: the index of the element in a [B, H] array.
  __device__ __forceinline__ int64_t element(const Slots& sl, int i, int H) const {
    return static_cast<int64_t>(b_begin + sl.row(i)) * H + j0 + sl.unit(i);
  }

  // MMA of one batch chunk (rows [0, rows) of B at sB_chunk) into red[kg]; red[0] ends up holding the full sums
  // for rows [0, rows_used).
  template <typename T>
  __device__ __forceinline__ void chunk_mma(const PersistentPlan& plan, const unsigned char* sB_chunk, int rows,
                                            int rows_used) {
    const int rows_pad = plan.m_tiles * 16, n_tiles = (rows + 7) / 8;
    if (mt_count > 0) {
      Acc acc;
#pragma unroll
      for (int mt = 0; mt < kMtPerWarp; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
      warp_mma<T>(sA, plan.a_stride, sB_chunk, plan.b_stride, mt0, mt_count, n_tiles, kb0, kb1, acc);
      store_partials(acc, red, rows_pad, plan.chunk, kg, mt0, mt_count, n_tiles);
    }
    __syncthreads();
    if (plan.warps_k > 1) {
      const int64_t slice = static_cast<int64_t>(rows_pad) * plan.chunk;
      for (int e = threadIdx.x; e < rows_used * plan.chunk; e += kThreads) {
        if (e % plan.chunk >= rows) continue;
        float s = red[e];
        for (int k = 1; k < plan.warps_k; ++k) s += red[k * slice + e];
        red[e] = s;
      }
      __syncthreads();
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------
// A row r = g*units + u: W_hh[g*H + j0 + u, 0:H], zero beyond H columns and for padded units / rows.
template <typename T>
__device__ void load_weights_forward(const PersistentPlan& plan, const T* w_hh, int G, int H, int j0, int n_units,
                                     unsigned char* sA) {
  const int rows_pad = plan.m_tiles * 16, vecs = plan.k_padded / 8;
  for (int i = threadIdx.x; i < rows_pad * vecs; i += kThreads) {
    const int r = i / vecs, k0 = (i % vecs) * 8;
    const int g = r / plan.units, u = r % plan.units;
    const bool row_ok = g < G && u < n_units;
    const T* src = w_hh + (static_cast<int64_t>(g) * H + j0 + u) * H;
    T v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = mma_operand<T>(row_ok && k0 + e < H ? to_f(src[k0 + e]) : 0.f);
    T* dst = reinterpret_cast<T*>(sA + r * plan.a_stride) + k0;
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = v[e];
  }
}

// A thread's per-slot values that wait across the MMA live in shared memory, not registers (the MMA needs them
// all: 64 accumulators, fragments in flight): the step's x_gates of the slot's gates (GRU: r z n and b_hn), loaded
// into registers before the step's wait and parked after it; then, replacing them, the workspace entries (LSTM i f g
// o c, GRU r z n h_n), stored to global memory after the publish. Value v of the CTA's item n at park[v * stride +
// n]: each item is one thread's, and a warp touches consecutive words (no bank conflict).
constexpr int kParked = 5;
constexpr int kInputs = 4;  // x_gates values per slot

struct Park {
  float* base;  // item 0 of this CTA
  int stride;   // floats between two values of an item: the CTA's items rounded up to 32

  __device__ __forceinline__ float& at(int i, int v) const {
    return base[v * stride + static_cast<int>(threadIdx.x) + i * kThreads];
  }
};

__device__ __forceinline__ void park_inputs(const Park& park, const Slots& sl, const float (&in)[kSlots][kInputs]) {
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    if (sl.owns(i)) {
#pragma unroll
      for (int v = 0; v < kInputs; ++v) park.at(i, v) = in[i][v];
    }
  }
}

// Loads step t's x_gates of every slot (the latency hides behind the wait and the MMA) and its validity bits;
// prefetches step t_next's into L2.
template <typename T>
__device__ __forceinline__ void load_step_inputs(const PersistentForward& p, const Cta& cta, const Slots& sl, int t,
                                                 int t_next, bool prefetch, float (&io)[kSlots][kInputs],
                                                 unsigned* valid) {
  const Cell cell = static_cast<Cell>(p.cell);
  const int G = num_gates(cell), H = p.H, GH = G * H;
  *valid = 0;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    if (sl.owns(i)) {
      const int b = cta.b_begin + sl.row(i), j = cta.j0 + sl.unit(i);
      const T* row = static_cast<const T*>(p.x_gates) + (static_cast<int64_t>(t) * p.B + b) * GH + j;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        io[i][g] = 0.f;
        if (g < G) {
          io[i][g] = to_f(row[g * H]);
          if (prefetch) ptx::prefetch_global_l2(row + static_cast<int64_t>(t_next - t) * p.B * GH + g * H);
        }
      }
      if (cell == Cell::GRU) io[i][3] = p.b_hn != nullptr ? to_f(static_cast<const T*>(p.b_hn)[j]) : 0.f;
      if (step_valid(p.lengths, b, t)) *valid |= 1u << i;
    }
  }
}

template <typename T, bool kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    rnn_persistent_forward_kernel(const PersistentForward p, const PersistentPlan plan) {
  if constexpr (kCluster && kNoClusters) {
    __trap();
  } else {
    FUSEDRNN_DYNAMIC_SMEM(unsigned char, smem);
    const Cell cell = static_cast<Cell>(p.cell);
    const int G = num_gates(cell), H = p.H, B = p.B, units = plan.units;
    const int64_t W = workspace_width(cell, H, false);
    Cta cta{};
    cta.init(plan, H, B, smem);
    Slots sl;
    sl.init(cta.n_units, cta.b_end - cta.b_begin);
    T* stage = static_cast<T*>(cta.stage);
    const Park park{reinterpret_cast<float*>(static_cast<unsigned char*>(cta.stage) + plan.smem_stage),
                    plan.smem_park / (kParked * 4)};
    T* exchange = static_cast<T*>(p.exchange);
    const int64_t exchange_step = static_cast<int64_t>(B) * plan.k_padded;
    unsigned* flags = kCluster ? nullptr : p.flags + cta.group * plan.ctas;  // this group's
    const bool slices = !kCluster && slices_stageable<T>(units);

    float h[kSlots], c[kSlots];  // the state of the thread's items, for all T steps
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      h[i] = c[i] = 0.f;
      if (sl.owns(i)) {
        const int64_t si = cta.element(sl, i, H);
        h[i] = p.h_state[si];
        if (cell == Cell::LSTM) c[i] = p.c_state[si];
      }
    }

    load_weights_forward<T>(plan, static_cast<const T*>(p.w_hh), G, H, cta.j0, cta.n_units, cta.sA);
    if constexpr (kCluster) {  // B buffer 0 = h0 of this cluster's rows, zero padding everywhere else
      zero_smem(cta.sB, plan.smem_b);
      zero_smem(static_cast<unsigned char*>(cta.stage), plan.smem_stage);
      __syncthreads();
      for (int i = threadIdx.x; i < (cta.b_end - cta.b_begin) * H; i += kThreads) {
        const int r = i / H, k = i % H;
        reinterpret_cast<T*>(cta.sB + r * plan.b_stride)[k] =
            mma_operand<T>(p.h_state[static_cast<int64_t>(cta.b_begin + r) * H + k]);
      }
      cluster_sync_all();  // every CTA's buffers are initialised before anyone writes into them
    } else {  // epoch 0: exchange buffer 0 = h0, this CTA's columns
      if (slices) zero_smem(cta.sB, plan.smem_b);  // the padding columns no slice covers (ordered by the wait's bar.sync)
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        if (sl.owns(i)) {
          exchange[static_cast<int64_t>(cta.b_begin + sl.row(i)) * plan.k_padded + cta.j0 + sl.unit(i)] = mma_operand<T>(h[i]);
        }
      }
      __syncthreads();
      release_flag(flags + cta.rank, 1);
    }

    float io[kSlots][kInputs];
    unsigned valid;
    {
      const int t0 = p.reverse ? p.T - 1 : 0;
      load_step_inputs<T>(p, cta, sl, t0, p.reverse ? t0 - 1 : t0 + 1, p.T > 1, io, &valid);
    }
    for (int s = 0; s < p.T; ++s) {
      const int t = p.reverse ? p.T - 1 - s : s;
      const bool last = s + 1 == p.T;
      // 1. Wait for h_{t-1} (epoch s) of every CTA; meanwhile this step's x_gates arrive.
      if constexpr (kCluster) {
        if (s > 0) ptx::cluster_wait_acquire();
      } else if (slices) {
        wait_and_stage_slices<T>(flags, plan.ctas, s + 1, units, 1, 0, cta.sB, plan.b_stride,
                                 exchange + (s & 1) * exchange_step + static_cast<int64_t>(cta.b_begin) * plan.k_padded,
                                 min(plan.chunk, cta.b_end - cta.b_begin), plan.k_padded);
      } else {
        wait_flags(flags, plan.ctas, s + 1);
      }
      park_inputs(park, sl, io);
      // 2. Per chunk: the gates of this CTA's units (MMA), then the cell of the slots in the chunk. Only the
      //    exchanged h is stored now: it is what the other CTAs wait for.
      for (int b0 = cta.b_begin; b0 < cta.b_end; b0 += plan.chunk) {
        const int rows = min(plan.chunk, cta.b_end - b0), r0 = b0 - cta.b_begin;
        const unsigned char* sB_chunk;
        if constexpr (kCluster) {
          sB_chunk = cta.sB + (s & 1) * plan.chunk * plan.b_stride;
        } else {
          if (!slices || b0 != cta.b_begin) {  // the first chunk came with the wait
            stage_rows<T>(cta.sB, plan.b_stride, exchange + (s & 1) * exchange_step + static_cast<int64_t>(b0) * plan.k_padded,
                          rows, plan.k_padded);
          }
          sB_chunk = cta.sB;
        }
        cta.chunk_mma<T>(plan, sB_chunk, rows, G * units);

        // red[0][g*units + u][r] holds W_hh h of gate g of unit u, chunk row r.
        const int64_t gate_stride = static_cast<int64_t>(units) * plan.chunk;
#pragma unroll
        for (int i = 0; i < kSlots; ++i) {
          const int r = sl.in_chunk(i, r0, rows);
          if (r < 0) continue;
          const int u = sl.unit(i);
          const float* hg = cta.red + u * plan.chunk + r;  // gate g at hg[g * gate_stride]
          float pre[4] = {0.f, 0.f, 0.f, 0.f};
          if (cell == Cell::GRU) {
            pre[0] = hg[0] + park.at(i, 0);
            pre[1] = hg[gate_stride] + park.at(i, 1);
            pre[2] = park.at(i, 2);
            pre[3] = hg[2 * gate_stride] + park.at(i, 3);
          } else {
#pragma unroll
            for (int g = 0; g < 4; ++g) {
              if (g < G) pre[g] = hg[g * gate_stride] + park.at(i, g);
            }
          }
          float ws[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, c_new = 0.f;
          const float out = cell_forward_values(cell, pre, h[i], c[i], ws, &c_new);
#pragma unroll
          for (int e = 0; e < kParked; ++e) park.at(i, e) = ws[e];  // the x_gates are consumed
          if ((valid >> i) & 1u) {
            h[i] = out;
            c[i] = c_new;
          }
          if (!last) {
            if constexpr (kCluster) {
              stage[r * units + u] = mma_operand<T>(h[i]);
            } else {
              exchange[((s + 1) & 1) * exchange_step + static_cast<int64_t>(b0 + r) * plan.k_padded + cta.j0 + u] =
                  mma_operand<T>(h[i]);
            }
          }
        }
        __syncthreads();  // red, the staged chunk and the stage are reused next
      }
      // 3. Publish h_t (epoch s + 1): the release waits only for the exchange stores issued so far.
      if (!last) {
        if constexpr (kCluster) {
          cluster_publish<T>(stage, cta.b_end - cta.b_begin, 1, units, 0, cta.j0,
                             cta.sB + ((s + 1) & 1) * plan.chunk * plan.b_stride, plan.b_stride, plan.ctas);
          ptx::cluster_arrive_release();
        } else {
          release_flag(flags + cta.rank, s + 2);
        }
      }
      // 4. Off the critical path, while the other CTAs catch up: y and the workspace of step t, then the next
      //    step's x_gates into registers.
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        if (sl.owns(i)) {
          const int b = cta.b_begin + sl.row(i), j = cta.j0 + sl.unit(i);
          const int64_t row = static_cast<int64_t>(t) * B + b;
          static_cast<T*>(p.y)[row * H + j] = from_f<T>((valid >> i) & 1u ? h[i] : 0.f);
          if (p.ws != nullptr) {
            float ws[kParked];
#pragma unroll
            for (int e = 0; e < kParked; ++e) ws[e] = park.at(i, e);
            store_workspace<T>(cell, ws, static_cast<T*>(p.ws) + row * W, H, j, false);
          }
        }
      }
      if (!last) {
        const int t_next = p.reverse ? t - 1 : t + 1;
        load_step_inputs<T>(p, cta, sl, t_next, p.reverse ? t_next - 1 : t_next + 1, s + 2 < p.T, io, &valid);
      }
    }

#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      if (sl.owns(i)) {
        const int64_t si = cta.element(sl, i, H);
        static_cast<T*>(p.h_n)[si] = from_f<T>(h[i]);
        if (cell == Cell::LSTM) static_cast<T*>(p.c_n)[si] = from_f<T>(c[i]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------
// A row u, column n = g*HP + jj: W_hh[g*H + jj, j0 + u] (HP = hidden_padded), zero for jj >= H and padding.
template <typename T>
__device__ void load_weights_backward(const PersistentPlan& plan, const T* w_hh, int G, int H, int j0, int n_units,
                                      unsigned char* sA) {
  const int rows_pad = plan.m_tiles * 16, HP = plan.hidden_padded;
  // u fastest: a warp reads consecutive columns of one W_hh row (coalesced); this runs once per launch.
  for (int i = threadIdx.x; i < rows_pad * plan.k_padded; i += kThreads) {
    const int u = i % rows_pad, n = i / rows_pad;
    const int g = n / HP, jj = n % HP;
    const bool ok = u < n_units && g < G && jj < H;
    const float v = ok ? to_f(w_hh[(static_cast<int64_t>(g) * H + jj) * H + j0 + u]) : 0.f;
    reinterpret_cast<T*>(sA + u * plan.a_stride)[n] = mma_operand<T>(v);
  }
}

template <typename T, bool kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    rnn_persistent_backward_kernel(const PersistentBackward p, const PersistentPlan plan) {
  if constexpr (kCluster && kNoClusters) {
    __trap();
  } else {
    FUSEDRNN_DYNAMIC_SMEM(unsigned char, smem);
    const Cell cell = static_cast<Cell>(p.cell);
    const int G = num_gates(cell), H = p.H, B = p.B, GH = G * H, units = plan.units, HP = plan.hidden_padded;
    const int64_t W = workspace_width(cell, H, false);
    Cta cta{};
    cta.init(plan, H, B, smem);
    Slots sl;
    sl.init(cta.n_units, cta.b_end - cta.b_begin);
    T* stage = static_cast<T*>(cta.stage);
    T* exchange = static_cast<T*>(p.exchange);
    const int64_t exchange_step = static_cast<int64_t>(B) * plan.k_padded;
    unsigned* flags = kCluster ? nullptr : p.flags + cta.group * plan.ctas;  // this group's
    const bool slices = !kCluster && slices_stageable<T>(units);

    float grad_h[kSlots], grad_c[kSlots];  // dL/dh_t, dL/dc_t of the thread's items, carried over all steps
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      grad_h[i] = grad_c[i] = 0.f;
      if (sl.owns(i)) {
        const int64_t si = cta.element(sl, i, H);
        grad_h[i] = p.grad_h[si];
        if (cell == Cell::LSTM) grad_c[i] = p.grad_c[si];
      }
    }

    load_weights_backward<T>(plan, static_cast<const T*>(p.w_hh), G, H, cta.j0, cta.n_units, cta.sA);
    if constexpr (kCluster) {
      zero_smem(cta.sB, plan.smem_b);
      zero_smem(static_cast<unsigned char*>(cta.stage), plan.smem_stage);
      cluster_sync_all();
    } else {
      if (slices) zero_smem(cta.sB, plan.smem_b);  // the padding columns no slice covers
      __syncthreads();
    }

    for (int bs = 0; bs < p.T; ++bs) {  // backward step bs undoes forward step T-1-bs
      const int t = p.reverse ? bs : p.T - 1 - bs;
      const bool last = bs + 1 == p.T;
      const int t_next = p.reverse ? t + 1 : t - 1;
      // 1. Pointwise: gate gradients of this CTA's units from dL/dh_t. Only the exchanged ones (the h side) are
      //    stored now; the rows of grad_xg / grad_hg wait in gx until after the publish.
      float gx[kSlots][6];  // x-side gate gradients, then (GRU) the h-side ones
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        if (!sl.owns(i)) continue;
        const int r = sl.row(i), u = sl.unit(i);
        const int b = cta.b_begin + r, j = cta.j0 + u;
        const int64_t row = static_cast<int64_t>(t) * B + b;
        const int len = p.lengths != nullptr ? static_cast<int>(p.lengths[b]) : p.T;
        GateGrads d{};
        if (t < len) {
          const float grad_out = grad_h[i] + to_f(static_cast<const T*>(p.grad_y)[row * H + j]);
          const T* ws_row = static_cast<const T*>(p.ws) + row * W;
          float prev = 0.f, y_t = 0.f;
          if (cell == Cell::LSTM) {
            const int tp = previous_time(t, len, p.reverse != 0);
            prev = tp >= 0 ? to_f(static_cast<const T*>(p.ws)[(static_cast<int64_t>(tp) * B + b) * W + 4 * H + j])
                           : to_f(static_cast<const T*>(p.c0)[static_cast<int64_t>(b) * H + j]);
          } else if (cell == Cell::GRU) {
            prev = to_f(static_cast<const T*>(p.h_prev)[row * H + j]);
          } else {
            y_t = to_f(static_cast<const T*>(p.y)[row * H + j]);
          }
          d = cell_backward<T>(cell, ws_row, H, j, prev, y_t, grad_out, grad_c[i]);
          grad_c[i] = d.c_prev;
          grad_h[i] = d.h_direct;  // the MMA below adds dgates W_hh; invalid steps keep the carried value
        }
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          if (g < G) {
            gx[i][g] = d.x[g];
            if (g < 3) gx[i][3 + g] = d.h[g];
            const T v = mma_operand<T>(d.h[g]);
            if constexpr (kCluster) {
              stage[(r * G + g) * units + u] = v;
            } else {
              exchange[(bs & 1) * exchange_step + static_cast<int64_t>(b) * plan.k_padded + g * HP + j] = v;
            }
          }
        }
      }
      // 2. Publish the gate gradients (epoch bs).
      __syncthreads();
      if constexpr (kCluster) {
        cluster_publish<T>(stage, cta.b_end - cta.b_begin, G, units, HP, cta.j0, cta.sB + (bs & 1) * plan.chunk * plan.b_stride,
                           plan.b_stride, plan.ctas);
        ptx::cluster_arrive_release();
      } else {
        release_flag(flags + cta.rank, bs + 1);
      }
      // 3. Off the critical path: the gate-gradient rows of step t; the next step's rows from HBM into L2.
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        if (!sl.owns(i)) continue;
        const int b = cta.b_begin + sl.row(i), j = cta.j0 + sl.unit(i);
        const int64_t row = static_cast<int64_t>(t) * B + b;
        T* grad_xg = static_cast<T*>(p.grad_xg) + row * GH + j;
        T* grad_hg = cell == Cell::GRU ? static_cast<T*>(p.grad_hg) + row * GH + j : nullptr;
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          if (g < G) {
            grad_xg[g * H] = from_f<T>(gx[i][g]);
            if (g < 3 && grad_hg != nullptr) grad_hg[g * H] = from_f<T>(gx[i][3 + g]);
          }
        }
        if (!last) {
          const int64_t next = static_cast<int64_t>(t_next) * B + b;
          ptx::prefetch_global_l2(static_cast<const T*>(p.grad_y) + next * H + j);
          if (W > 0) {
            for (int g = 0; g < (cell == Cell::LSTM ? 5 : 4); ++g) ptx::prefetch_global_l2(static_cast<const T*>(p.ws) + next * W + g * H + j);
          }
        }
      }
      // 4. Wait for every CTA's gate gradients.
      if constexpr (kCluster) {
        ptx::cluster_wait_acquire();
      } else if (slices) {
        wait_and_stage_slices<T>(flags, plan.ctas, bs + 1, units, G, HP, cta.sB, plan.b_stride,
                                 exchange + (bs & 1) * exchange_step + static_cast<int64_t>(cta.b_begin) * plan.k_padded,
                                 min(plan.chunk, cta.b_end - cta.b_begin), plan.k_padded);
      } else {
        wait_flags(flags, plan.ctas, bs + 1);
      }
      // 5. dL/dh_{t-1} of this CTA's units += dgates_t W_hh[:, units].
      for (int b0 = cta.b_begin; b0 < cta.b_end; b0 += plan.chunk) {
        const int rows = min(plan.chunk, cta.b_end - b0), r0 = b0 - cta.b_begin;
        const unsigned char* sB_chunk;
        if constexpr (kCluster) {
          sB_chunk = cta.sB + (bs & 1) * plan.chunk * plan.b_stride;
        } else {
          if (!slices || b0 != cta.b_begin) {  // the first chunk came with the wait
            stage_rows<T>(cta.sB, plan.b_stride, exchange + (bs & 1) * exchange_step + static_cast<int64_t>(b0) * plan.k_padded,
                          rows, plan.k_padded);
          }
          sB_chunk = cta.sB;
        }
        cta.chunk_mma<T>(plan, sB_chunk, rows, units);
#pragma unroll
        for (int i = 0; i < kSlots; ++i) {
          const int r = sl.in_chunk(i, r0, rows);
          if (r >= 0) grad_h[i] += cta.red[sl.unit(i) * plan.chunk + r];
        }
        __syncthreads();
      }
    }

#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      if (sl.owns(i)) {
        const int64_t si = cta.element(sl, i, H);
        static_cast<T*>(p.grad_h0)[si] = from_f<T>(grad_h[i]);
        if (cell == Cell::LSTM) static_cast<T*>(p.grad_c0)[si] = from_f<T>(grad_c[i]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side: kernel selection, occupancy, launch
// ---------------------------------------------------------------------------------------------------
using ForwardKernel = void (*)(const PersistentForward, const PersistentPlan);
using BackwardKernel = void (*)(const PersistentBackward, const PersistentPlan);

template <typename T>
ForwardKernel forward_kernel_t(Exchange ex) {
  return ex == Exchange::Cluster ? rnn_persistent_forward_kernel<T, true> : rnn_persistent_forward_kernel<T, false>;
}
template <typename T>
BackwardKernel backward_kernel_t(Exchange ex) {
  return ex == Exchange::Cluster ? rnn_persistent_backward_kernel<T, true> : rnn_persistent_backward_kernel<T, false>;
}

ForwardKernel forward_kernel(Exchange ex, DType dt) {
  return dt == DType::F32 ? forward_kernel_t<float>(ex)
         : dt == DType::F16 ? forward_kernel_t<__half>(ex)
                            : forward_kernel_t<__nv_bfloat16>(ex);
}
BackwardKernel backward_kernel(Exchange ex, DType dt) {
  return dt == DType::F32 ? backward_kernel_t<float>(ex)
         : dt == DType::F16 ? backward_kernel_t<__half>(ex)
                            : backward_kernel_t<__nv_bfloat16>(ex);
}

const void* kernel_symbol(Exchange ex, bool backward, DType dt) {
  return backward ? reinterpret_cast<const void*>(backward_kernel(ex, dt))
                  : reinterpret_cast<const void*>(forward_kernel(ex, dt));
}

std::string cuda_reason(const char* what, cudaError_t err) {
  cudaGetLastError();  // clear it, so that the next launch check does not report it
  return std::string(what) + " failed: " + cudaGetErrorString(err);
}

cudaLaunchConfig_t cluster_config(const PersistentPlan& plan, cudaStream_t stream, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(plan.ctas * plan.groups);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = plan.smem_bytes;
  cfg.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = plan.ctas;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }
int round_up(int a, int b) { return ceil_div(a, b) * b; }

// Shared-memory row stride for rows of k elements read as 16-byte vectors by lanes (g = lane/4, q = lane%4):
// 16-bit rows g, g+1 must fall 64 bytes apart modulo 128 (one 8-lane phase reads 2 rows x 64 bytes), fp32 rows
// 16 bytes apart (each lane reads 32 bytes as two 16-byte halves); either way bank-conflict free.
int smem_stride(int k, int esize) { return round_up(k * esize, 128) + (esize == 2 ? 64 : 16); }

std::string kb(int64_t bytes) { return std::to_string((bytes + 1023) / 1024) + " KB"; }

// The sm_90 builds of these kernels carry 1 KB of reserved static shared memory (.nv.shared.reserved, shown as
// SHARED:1024 by cuobjdump -res-usage); left out of the dynamic budget on every arch to keep one rule.
constexpr int kReservedSmem = 1024;

// Per-CTA weight bytes above which a larger cluster is preferred (more SMs share the MMA work). Placeholder to
// be tuned on the GPU campaign (issue #8).
constexpr int kClusterWeightTarget = 64 * 1024;

// The plan for `ctas` CTAs of `units` units each, on groups of `rows` batch rows (the grid exchange; a cluster's group
// is one chunk, chosen here).
std::string plan_with(Exchange ex, bool backward, int G, int esize, int B, int H, int ctas, int units, int rows,
                      const DeviceLimits& lim, PersistentPlan* out) {
  PersistentPlan pl;
  pl.ctas = ctas;
  pl.units = units;
  pl.hidden_padded = ctas * units;
  const int w_rows = backward ? units : G * units;
  pl.m_tiles = ceil_div(w_rows, 16);
  pl.warps_m = 1;
  while (pl.warps_m * kMtPerWarp < pl.m_tiles) pl.warps_m *= 2;
  if (pl.warps_m > kWarps) {
    return "needs " + std::to_string(w_rows) + " rows of W_hh per CTA, over the " + std::to_string(kWarps * kMtPerWarp * 16) +
           " one CTA's warps can hold";
  }
  pl.warps_k = kWarps / pl.warps_m;
  pl.k_padded = round_up(backward ? G * pl.hidden_padded : pl.hidden_padded, kKBlock);
  pl.a_stride = pl.b_stride = smem_stride(pl.k_padded, esize);
  pl.smem_a = pl.m_tiles * 16 * pl.a_stride;
  const bool cluster = ex == Exchange::Cluster;
  for (int chunk = std::min(kMaxChunk, round_up(std::min(rows, B), 8)); chunk >= 8; chunk -= 8) {
    if (cluster && units * chunk > kSlots * kThreads) continue;  // the state items of a CTA: its rows x its units
    pl.chunk = chunk;
    pl.smem_b = (cluster ? 2 : 1) * chunk * pl.b_stride;
    pl.smem_red = pl.warps_k * pl.m_tiles * 16 * chunk * 4;
    pl.smem_stage = cluster ? round_up(chunk * (backward ? G : 1) * units * esize, 16) : 0;
    // forward: the parked values of the CTA's items
    pl.smem_park = backward ? 0 : kParked * 4 * round_up(units * (cluster ? chunk : std::min(rows, B)), 32);
    pl.smem_bytes = pl.smem_a + pl.smem_b + pl.smem_red + pl.smem_stage + pl.smem_park;
    if (pl.smem_bytes + kReservedSmem <= lim.smem_per_block) {
      pl.group_rows = cluster ? chunk : std::min(rows, B);
      pl.groups = ceil_div(B, pl.group_rows);
      *out = pl;
      return "";
    }
  }
  const int chunk = 8;
  const int need = pl.smem_a + (cluster ? 2 : 1) * chunk * pl.b_stride + pl.warps_k * pl.m_tiles * 16 * chunk * 4 +
                   (backward ? 0 : kParked * 4 * round_up(units * 8, 32));
  return "needs " + kb(need + kReservedSmem) + " of shared memory per CTA (its W_hh slice alone " + kb(pl.smem_a) + ", on " +
         std::to_string(ctas) + " CTAs), over the " + kb(lim.smem_per_block) + " per block of this GPU";
}

// Grid exchange: as few CTAs per group as keep every CTA's m-tiles full (fewer CTAs read less of the exchanged B
// from L2), then the batch split into as many groups as the SMs hold (one CTA each): a group's CTAs stage and
// multiply only its rows, and groups never wait on each other. A CTA keeps the state of its rows x units in
// registers: a large batch takes more CTAs of fewer units. At most one CTA of a group per thread (each polls one
// flag).
std::string plan_grid(bool backward, int G, int esize, int B, int H, const DeviceLimits& lim, PersistentPlan* plan) {
  const int max_ctas = std::min(lim.sm_count, kThreads);
  int units = ceil_div(H, max_ctas);
  units = backward ? round_up(units, 16) : std::max(units, ceil_div(G * units, 16) * 16 / G);
  for (; units >= 1; --units) {
    const int ctas = ceil_div(H, units);
    if (ctas > max_ctas) break;
    for (int rows = std::min(8, B);; rows = std::min(rows + 8, B)) {  // group rows: a multiple of 8, or all of B
      if (ctas * ceil_div(B, rows) <= lim.sm_count && units * rows <= kSlots * kThreads) {
        return plan_with(Exchange::Grid, backward, G, esize, B, H, ctas, units, rows, lim, plan);
      }
      if (rows == B) break;
    }
  }
  return "keeps the state of its batch rows x hidden units in registers, at most " + std::to_string(kSlots * kThreads) +
         " per CTA: a batch of " + std::to_string(B) + " at hidden size " + std::to_string(H) + " needs more than the " +
         std::to_string(lim.sm_count) + " CTAs this GPU runs at once";
}

}  // namespace

std::string plan_persistent(Exchange ex, bool backward, int cell, DType dt, int B, int H, const DeviceLimits& lim,
                            PersistentPlan* plan) {
  const int G = num_gates(static_cast<Cell>(cell)), esize = dtype_size(dt);
  if (lim.cc_major < 8) return "needs sm_80 or newer (mma.sync on bf16/tf32, cp.async)";
  if (B < 1) return "has nothing to run on an empty batch";
  if (ex == Exchange::Grid) return plan_grid(backward, G, esize, B, H, lim, plan);
  if (lim.cc_major < 9) return "thread-block clusters need sm_90 or newer";
  // Clusters: units a multiple of 16 bytes (the DSMEM copy); the smallest cluster whose per-CTA weights stay
  // under kClusterWeightTarget, else the smallest that fits at all.
  std::string why = "hidden size too large for a 16-CTA cluster";
  bool have = false;
  PersistentPlan first;
  for (int ctas = 1; ctas <= 16; ctas *= 2) {
    const int units = round_up(ceil_div(H, ctas), 16 / esize);
    if ((ctas - 1) * units >= H) continue;  // a CTA without units
    PersistentPlan pl;
    const std::string r = plan_with(ex, backward, G, esize, B, H, ctas, units, B, lim, &pl);
    if (!r.empty()) {
      why = "a " + std::to_string(ctas) + "-CTA cluster " + r;
      continue;
    }
    if (pl.smem_a <= kClusterWeightTarget) {
      *plan = pl;
      return "";
    }
    if (!have) first = pl, have = true;
  }
  if (have) {
    *plan = first;
    return "";
  }
  return why;
}

namespace {

// Process-wide answers that never change: per device its limits; per (device, kernel) the attributes set; per
// (device, call shape) the plan and whether it fits.
std::mutex g_mu;
std::map<int, DeviceLimits> g_limits;
std::set<std::pair<int, const void*>> g_prepared;
using PlanKey = std::tuple<int, int, bool, int, int, int, int>;  // device, exchange, backward, cell, dtype, B, H
std::map<PlanKey, std::pair<std::string, PersistentPlan>> g_plans;

cudaError_t device_limits(int device, DeviceLimits* lim) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_limits.find(device);
    if (it != g_limits.end()) {
      *lim = it->second;
      return cudaSuccess;
    }
  }
  DeviceLimits l{};
  cudaError_t err = cudaDeviceGetAttribute(&l.sm_count, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&l.smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&l.cc_major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(g_mu);
  g_limits[device] = l;
  *lim = l;
  return cudaSuccess;
}

// Once per (device, kernel), before any occupancy query or launch: the dynamic shared-memory limit at the most any
// plan uses on this device (so no launch sets it to its own size, which raced with another host thread launching
// the same kernel with a different plan), and 16-CTA clusters allowed for the cluster kernels.
cudaError_t prepare_kernel(const void* kernel, Exchange ex, int device, const DeviceLimits& lim) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_prepared.count({device, kernel}) != 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, lim.smem_per_block - kReservedSmem);
  if (err == cudaSuccess && ex == Exchange::Cluster) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  }
  if (err == cudaSuccess) g_prepared.insert({device, kernel});
  return err;
}

// Whether the planned grid is co-resident: every CTA of the cooperative grid, every cluster at once (clusters never
// wait on each other, so non-resident ones would be correct, but would run one after another).
std::string check_occupancy(Exchange ex, bool backward, DType dt, const PersistentPlan& plan, int device,
                            const DeviceLimits& lim) {
  const void* kernel = kernel_symbol(ex, backward, dt);
  cudaError_t err = prepare_kernel(kernel, ex, device, lim);
  if (err != cudaSuccess) return cuda_reason("cudaFuncSetAttribute", err);
  if (ex == Exchange::Grid) {
    int per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, plan.smem_bytes);
    if (err != cudaSuccess) return cuda_reason("cudaOccupancyMaxActiveBlocksPerMultiprocessor", err);
    if (per_sm * lim.sm_count < plan.ctas * plan.groups) {
      return "its grid of " + std::to_string(plan.ctas * plan.groups) + " CTAs (" + kb(plan.smem_bytes) +
             " shared memory each) cannot be co-resident: " + std::to_string(per_sm) + " per SM x " +
             std::to_string(lim.sm_count) + " SMs";
    }
    return "";
  }
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(plan, nullptr, &attr);
  int clusters = 0;
  err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
  if (err != cudaSuccess) return cuda_reason("cudaOccupancyMaxActiveClusters", err);
  if (clusters < plan.groups) {
    return "needs " + std::to_string(plan.groups) + " clusters of " + std::to_string(plan.ctas) + " CTAs (" +
           kb(plan.smem_bytes) + " shared memory each) at once for its batch, and this GPU holds " +
           std::to_string(clusters);
  }
  return "";
}

}  // namespace

std::string plan_persistent_for_device(Exchange ex, bool backward, int cell, DType dt, int B, int H, int device,
                                       PersistentPlan* plan) {
  const PlanKey key{device, static_cast<int>(ex), backward, cell, static_cast<int>(dt), B, H};
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_plans.find(key);
    if (it != g_plans.end()) {
      *plan = it->second.second;
      return it->second.first;
    }
  }
  DeviceLimits lim;
  const cudaError_t err = device_limits(device, &lim);
  if (err != cudaSuccess) return cuda_reason("cudaDeviceGetAttribute", err);  // not cached: may be transient
  PersistentPlan pl;
  std::string why = plan_persistent(ex, backward, cell, dt, B, H, lim, &pl);
  if (why.empty()) why = check_occupancy(ex, backward, dt, pl, device, lim);
  if (!why.empty()) pl = PersistentPlan{};
  std::lock_guard<std::mutex> lock(g_mu);
  g_plans.emplace(key, std::make_pair(why, pl));
  *plan = pl;
  return why;
}

cudaError_t launch_persistent_forward(Exchange ex, DType dt, const PersistentPlan& plan, const PersistentForward& p,
                                      cudaStream_t stream) {
  const ForwardKernel kernel = forward_kernel(ex, dt);
  if (ex == Exchange::Grid) {
    return launch_cooperative(kernel, dim3(plan.ctas * plan.groups), dim3(kThreads), plan.smem_bytes, stream, p, plan);
  }
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(plan, stream, &attr);
  return launch_cluster(cfg, kernel, p, plan);
}

cudaError_t launch_persistent_backward(Exchange ex, DType dt, const PersistentPlan& plan,
                                       const PersistentBackward& p, cudaStream_t stream) {
  const BackwardKernel kernel = backward_kernel(ex, dt);
  if (ex == Exchange::Grid) {
    return launch_cooperative(kernel, dim3(plan.ctas * plan.groups), dim3(kThreads), plan.smem_bytes, stream, p, plan);
  }
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(plan, stream, &attr);
  return launch_cluster(cfg, kernel, p, plan);
}

}  // namespace fusedrnn::cuda
