// Backend "cpu" of fusedrnn::beam_topk: log_softmax + beam score + top-k over each item's K*V candidates in
// one pass over the logits, without writing a [B*K, V] log-prob tensor.
//
//   fusedrnn::cpu_beam_topk(Tensor logits [B*K, V], Tensor beam_scores [B*K], int k, int num_beams)
//       -> (scores [B, k] fp32 (fp64 for fp64 logits), tokens [B, k] int64, parents [B, k] int64)
//
// Semantics, tie rule and -inf/NaN policy: fusedrnn/reference_decoding.py (beam_topk_reference).
// Stage 1, parallel over rows: one pass per row in chunks of kChunk elements: chunk max -> online max m and
// sum s of exp(x - m); the row's top-min(k, V) by (raw logit desc, token asc), scanned only in chunks whose
// max beats the current k-th best. log_softmax and the beam score are per-row constants, so this per-row
// top-k on raw logits holds every candidate the merge can pick.
// Stage 2, parallel over batch items: score the K*min(k, V) row candidates and take the k best by
// (score desc with NaN first, beam asc, row rank asc) -- row rank being (logit desc, token asc).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/isa.h"

// The 32-byte vector helpers below are internal and inlined; gcc's note that their ABI differs with and
// without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fusedrnn::cpu {
namespace {

using at::Tensor;

// 512 floats = 2 KB stay in L1 between the max pass and the exp pass over a chunk.
constexpr int64_t kChunk = 512;

template <typename T>
inline T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// GCC/Clang vector extensions of VB bytes, one register at each ISA level (cpu/isa.h): 16 bytes at the
// baseline, 32 with AVX2 and AVX-512 (a chunk is 2 KB: wider vectors gain nothing measurable). Explicit,
// because gcc's auto-vectoriser left the exp loop scalar (12 ns/element instead of ~1).
template <int VB>
struct F32Vec {
  typedef float v __attribute__((vector_size(VB)));
  typedef int32_t i __attribute__((vector_size(VB)));
  static constexpr int lanes = VB / 4;
  static FUSEDRNN_ALWAYS_INLINE v load(const float* p) {
    v out;
    std::memcpy(&out, p, sizeof(out));
    return out;
  }
};
constexpr int kBeamVectorBytes(Isa isa) { return isa == Isa::kBaseline ? 16 : 32; }

// exp(x) for x <= 0 (x - row max), Cephes' expf polynomial: relative error < 3e-7 (~2 ulp) on [-87, 0]
// (checked against std::exp in tests/test_beam_topk.py through the scores). Rounds with the "magic number"
// 1.5 * 2^23 instead of floorf (SSE2 has no vector floor). x < -87 (incl. -inf) gives exactly 0.
template <int VB>
FUSEDRNN_ALWAYS_INLINE typename F32Vec<VB>::v exp_nonpos(typename F32Vec<VB>::v x) {
  using V = typename F32Vec<VB>::v;
  using I = typename F32Vec<VB>::i;
  const V kMagic = V{} + 12582912.0f;
  const I tiny = x < -87.0f;
  x = tiny ? V{} - 87.0f : x;
  const V fx = (x * 1.44269504088896341f + kMagic) - kMagic;
  V r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I e = (__builtin_convertvector(fx, I) + 127) << 23;
  const V scale = (V)e;  // same-size vector cast: the bits of e as floats (2^fx)
  return tiny ? V{} : p * scale;
}

template <typename acc_t>
struct ChunkStats {
  acc_t max;
  bool bad;  // NaN or +inf seen
};

// n is a multiple of 8 (the chunk buffer is padded with -inf).
template <typename T, Isa isa>
FUSEDRNN_ALWAYS_INLINE void chunk_stats_f32_body(const float* x, int64_t n, ChunkStats<float>* out) {
  using Vec = F32Vec<kBeamVectorBytes(isa)>;
  using V = typename Vec::v;
  using I = typename Vec::i;
  constexpr int L = Vec::lanes;
  V mx = V{} - std::numeric_limits<float>::infinity();
  I bad = I{};
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; i += L) {
    const V v = Vec::load(x + i);
    mx = v > mx ? v : mx;   // NaN compares false: ignored here, flagged below
    bad |= ~(v < inf);      // NaN or +inf
  }
  ChunkStats<float> st{mx[0], false};
  for (int j = 0; j < L; ++j) {
    st.max = mx[j] > st.max ? mx[j] : st.max;
    st.bad = st.bad || bad[j] != 0;
  }
  *out = st;
}
FUSEDRNN_ISA_LEVELS(chunk_stats_f32, (const float* x, int64_t n, ChunkStats<float>* out), (x, n, out))

template <typename T, Isa isa>
FUSEDRNN_ALWAYS_INLINE void chunk_exp_sum_f32_body(const float* x, int64_t n, float m, float* out) {
  constexpr int VB = kBeamVectorBytes(isa);
  using Vec = F32Vec<VB>;
  typename Vec::v acc{};
  for (int64_t i = 0; i < n; i += Vec::lanes) acc += exp_nonpos<VB>(Vec::load(x + i) - m);
  float s = 0.f;
  for (int j = 0; j < Vec::lanes; ++j) s += acc[j];
  *out = s;
}
FUSEDRNN_ISA_LEVELS(chunk_exp_sum_f32, (const float* x, int64_t n, float m, float* out), (x, n, m, out))

ChunkStats<float> chunk_stats(const float* x, int64_t n) {
  ChunkStats<float> st;
  chunk_stats_f32<float>(x, n, &st);
  return st;
}
float chunk_exp_sum(const float* x, int64_t n, float m) {
  float s;
  chunk_exp_sum_f32<float>(x, n, m, &s);
  return s;
}

inline bool any_greater8(const float* x, float thr) {
  using Vec = F32Vec<16>;  // row_pass runs at the build's default target, where 16-byte vectors are native
  const typename Vec::i gt = (Vec::load(x) > thr) | (Vec::load(x + 4) > thr);
  return (gt[0] | gt[1] | gt[2] | gt[3]) != 0;
}

// fp64 logits are rare (tests, spec checks): plain loops and std::exp.
ChunkStats<double> chunk_stats(const double* x, int64_t n) {
  ChunkStats<double> st{neg_inf<double>(), false};
  for (int64_t i = 0; i < n; ++i) {
    st.max = x[i] > st.max ? x[i] : st.max;
    st.bad = st.bad || !(x[i] < std::numeric_limits<double>::infinity());
  }
  return st;
}
inline bool any_greater8(const double* x, double thr) {
  bool any = false;
  for (int j = 0; j < 8; ++j) any = any || x[j] > thr;
  return any;
}
double chunk_exp_sum(const double* x, int64_t n, double m) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - m);
  return s;
}

template <typename acc_t>
struct RowResult {
  acc_t m;     // row max (-inf: dead row)
  acc_t s;     // sum of exp(x - m)
  bool bad;    // poisoned: NaN or +inf in the row
};

// One pass over a row: online max/sum and the row's top-kk (x desc, token asc) into cand_x/cand_tok.
template <typename scalar_t, typename acc_t>
RowResult<acc_t> row_pass(const scalar_t* row, int64_t V, int64_t kk, acc_t* cand_x, int64_t* cand_tok) {
  alignas(32) acc_t buf[kChunk];
  acc_t m = neg_inf<acc_t>();
  acc_t s = 0;
  int64_t count = 0;  // entries in the top-k list
  for (int64_t base = 0; base < V; base += kChunk) {
    const int64_t n = std::min(kChunk, V - base);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(row[base + i]);
    const int64_t n8 = (n + 7) & ~int64_t(7);
    for (int64_t i = n; i < n8; ++i) buf[i] = neg_inf<acc_t>();  // padding: no effect on max, sum or top-k
    const ChunkStats<acc_t> st = chunk_stats(buf, n8);
    if (st.bad) return {m, s, true};  // poisoned: its candidates are fixed (tokens 0..kk-1), stop reading
    const acc_t cmax = st.max;
    if (cmax > m) {
      s = s * std::exp(m - cmax);  // m = -inf: exp(-inf) = 0 and s = 0
      m = cmax;
    }
    if (m != neg_inf<acc_t>()) s += chunk_exp_sum(buf, n8, m);
    // top-k: while the list is not full everything enters; then only x > k-th best (an equal x has a
    // higher token and loses the tie). A chunk, then a group of 8, whose max doesn't beat it is skipped:
    // at k=64 most chunks hold some new entry but few groups do (3.0 -> 1.9 ns/element, V=128k).
    if (count == kk && !(cmax > cand_x[kk - 1])) continue;
    for (int64_t g = 0; g < n; g += 8) {
      if (count == kk && !any_greater8(buf + g, cand_x[kk - 1])) continue;
      const int64_t g_end = std::min(g + 8, n);
      for (int64_t i = g; i < g_end; ++i) {
        const acc_t v = buf[i];
        if (count == kk && !(v > cand_x[kk - 1])) continue;
        // insert after every entry with x >= v (they have lower tokens)
        const int64_t pos =
            std::upper_bound(cand_x, cand_x + count, v, [](acc_t a, acc_t b) { return a > b; }) - cand_x;
        for (int64_t j = std::min(count, kk - 1); j > pos; --j) {
          cand_x[j] = cand_x[j - 1];
          cand_tok[j] = cand_tok[j - 1];
        }
        cand_x[pos] = v;
        cand_tok[pos] = base + i;
        count = std::min(count + 1, kk);
      }
    }
  }
  return {m, s, false};
}

template <typename acc_t>
struct Candidate {
  acc_t score;
  int32_t beam;
  int32_t rank;
};

template <typename acc_t>
bool better(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  const bool an = std::isnan(a.score), bn = std::isnan(b.score);
  if (an != bn) return an;  // NaN first
  if (!an && a.score != b.score) return a.score > b.score;
  if (a.beam != b.beam) return a.beam < b.beam;
  return a.rank < b.rank;
}

template <typename scalar_t, typename acc_t>
void beam_topk_impl(const Tensor& logits, const Tensor& beam_scores, int64_t k, int64_t K, Tensor& scores,
                    Tensor& tokens, Tensor& parents) {
  const int64_t R = logits.size(0), V = logits.size(1), B = R / K;
  const int64_t kk = std::min(k, V);
  const int64_t row_stride = logits.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const acc_t* bs = beam_scores.const_data_ptr<acc_t>();
  std::vector<acc_t> cand_x(R * kk);
  std::vector<int64_t> cand_tok(R * kk);
  std::vector<RowResult<acc_t>> rows(R);

  // Rows of >= 64k elements are worth a thread each; small rows are grouped (forking costs ~5-10 us).
  const int64_t row_grain = std::max<int64_t>(1, (int64_t(1) << 16) / V);
  at::parallel_for(0, R, row_grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      rows[r] = row_pass<scalar_t, acc_t>(x + r * row_stride, V, kk, &cand_x[r * kk], &cand_tok[r * kk]);
      if (rows[r].bad) {
        for (int64_t j = 0; j < kk; ++j) cand_tok[r * kk + j] = j;
      }
    }
  });

  acc_t* out_s = scores.mutable_data_ptr<acc_t>();
  int64_t* out_t = tokens.mutable_data_ptr<int64_t>();
  int64_t* out_p = parents.mutable_data_ptr<int64_t>();
  const int64_t item_grain = std::max<int64_t>(1, 4096 / (K * kk));
  at::parallel_for(0, B, item_grain, [&](int64_t begin, int64_t end) {
    std::vector<Candidate<acc_t>> cand(K * kk);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t r = 0; r < K; ++r) {
        const int64_t row = b * K + r;
        const RowResult<acc_t>& rr = rows[row];
        const acc_t beam = bs[row];
        const bool poisoned = rr.bad || std::isnan(beam) || beam == std::numeric_limits<acc_t>::infinity();
        const bool dead = rr.m == neg_inf<acc_t>();
        const acc_t log_s = std::log(rr.s);
        for (int64_t j = 0; j < kk; ++j) {
          acc_t sc;
          if (poisoned) {
            sc = std::numeric_limits<acc_t>::quiet_NaN();
            cand_tok[row * kk + j] = j;
          } else if (dead) {
            sc = neg_inf<acc_t>();
          } else {
            sc = ((cand_x[row * kk + j] - rr.m) - log_s) + beam;
          }
          cand[r * kk + j] = {sc, static_cast<int32_t>(r), static_cast<int32_t>(j)};
        }
      }
      std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), better<acc_t>);
      for (int64_t i = 0; i < k; ++i) {
        const Candidate<acc_t>& c = cand[i];
        out_s[b * k + i] = c.score;
        out_t[b * k + i] = cand_tok[(b * K + c.beam) * kk + c.rank];
        out_p[b * k + i] = c.beam;
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> cpu_beam_topk(const Tensor& logits_in, const Tensor& beam_scores_in, int64_t k,
                                                 int64_t num_beams) {
  TORCH_CHECK(logits_in.device().is_cpu(), "fusedrnn cpu_beam_topk: logits must be a CPU tensor");
  TORCH_CHECK(logits_in.dim() == 2, "fusedrnn cpu_beam_topk: logits must be 2-D [batch*beams, vocab]");
  const int64_t R = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(num_beams > 0 && R % num_beams == 0 && R > 0 && V > 0,
              "fusedrnn cpu_beam_topk: logits rows (", R, ") must be a positive multiple of num_beams (", num_beams, ")");
  TORCH_CHECK(beam_scores_in.numel() == R, "fusedrnn cpu_beam_topk: beam_scores must have one element per row");
  TORCH_CHECK(k >= 1 && k <= num_beams * V, "fusedrnn cpu_beam_topk: k=", k, " must be in [1, num_beams*vocab]");
  TORCH_CHECK(num_beams * std::min(k, V) < (int64_t(1) << 31), "fusedrnn cpu_beam_topk: num_beams*k too large");
  const at::ScalarType acc = logits_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const Tensor beam_scores = beam_scores_in.reshape({R}).to(acc).contiguous();
  const int64_t B = R / num_beams;
  Tensor scores = at::empty({B, k}, logits.options().dtype(acc));
  Tensor tokens = at::empty({B, k}, logits.options().dtype(at::kLong));
  Tensor parents = at::empty({B, k}, logits.options().dtype(at::kLong));
  switch (logits.scalar_type()) {
    case at::kFloat:
      beam_topk_impl<float, float>(logits, beam_scores, k, num_beams, scores, tokens, parents);
      break;
    case at::kHalf:
      beam_topk_impl<c10::Half, float>(logits, beam_scores, k, num_beams, scores, tokens, parents);
      break;
    case at::kBFloat16:
      beam_topk_impl<c10::BFloat16, float>(logits, beam_scores, k, num_beams, scores, tokens, parents);
      break;
    case at::kDouble:
      beam_topk_impl<double, double>(logits, beam_scores, k, num_beams, scores, tokens, parents);
      break;
    default:
      TORCH_CHECK(false, "fusedrnn cpu_beam_topk: logits must be float16/bfloat16/float32/float64, got ",
                  logits.scalar_type());
  }
  return {scores, tokens, parents};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def("cpu_beam_topk(Tensor logits, Tensor beam_scores, int k, int num_beams) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("cpu_beam_topk", &cpu_beam_topk);
}

}  // namespace fusedrnn::cpu
