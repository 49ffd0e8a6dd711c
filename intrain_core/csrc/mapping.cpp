// The fixed-point mapping of a float32 CPU tensor to int8 mantissas, and the residual add's two
// mappings, in AVX-512 code.
//
// They compute exactly the bits of fixed_point.map_kernel and ops/add.py's _add (the definitions,
// and inductor's kernels on other devices): the shared exponent from the largest magnitude,
// x * 2**-exponent in the same two float32 multiplies, then stochastic rounding with the
// counter-based draws of rounding.py (element i of key (high, low) draws
// mix32(mix32(i ^ low) ^ high) >> 8) or round half to even, clamped to +-qmax. Written by hand
// because inductor's kernel took more than twice as long: 0.59 against 0.25 ms to map a
// 64x65x192 tensor stochastically on a 2-core Xeon (2026-12-03), where nearest rounding took
// 0.30 ms, so the draws were most of it. The same loop as plain C++ was not vectorised by g++ 12
// here; hence the intrinsics.
#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlock = 4096;  // elements per scheduled block: a few pages, whole vectors

inline __m512i mix32(__m512i h) {  // rounding._mix32 on 16 lanes: products wrap modulo 2**32
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7FEB352D));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

// The pieces of x that the kernels walk: for a dense tensor, blocks of kBlock elements (one row
// may be long); for a strided view (attention's heads, a transposed key), the rows of its last
// dimension, contiguous in memory, read in place. Piece p's mantissas go to p * length.
struct Pieces {
  std::vector<int64_t> sizes, strides;  // of a view's dimensions before the last
  int64_t numel, length, count = 1;
  bool dense;

  Pieces(const torch::Tensor& x, bool transposed) : numel(x.numel()), dense(x.is_contiguous() && !transposed) {
    if (dense) {
      length = kBlock;
      count = (numel + kBlock - 1) / kBlock;
      return;
    }
    length = x.size(-1);
    for (int64_t d = 0; d + 1 < x.dim(); ++d) {
      sizes.push_back(x.size(d));
      strides.push_back(x.stride(d));
      count *= x.size(d);
    }
  }
  int64_t size(int64_t piece) const { return dense ? std::min(length, numel - piece * length) : length; }
  int64_t offset(int64_t piece) const {  // in x's memory
    if (dense) return piece * length;
    int64_t at = 0;
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      at += (piece % sizes[d]) * strides[d];
      piece /= sizes[d];
    }
    return at;
  }
  int64_t per_block() const { return std::max<int64_t>(1, kBlock / std::max<int64_t>(length, 1)); }
};

// The largest |x| as float bits: non-negative floats order as their bit patterns, and a NaN or
// infinity has bits at or above 0x7F800000, so one integer maximum also says "all finite".
uint32_t largest_magnitude_bits(const float* x, const Pieces& pieces) {
  uint32_t best = 0;
  const int64_t per_block = pieces.per_block();
#pragma omp parallel for reduction(max : best) schedule(static)
  for (int64_t first = 0; first < pieces.count; first += per_block) {
    __m512i local = _mm512_setzero_si512();
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    for (int64_t piece = first; piece < std::min(pieces.count, first + per_block); ++piece) {
      const float* in = x + pieces.offset(piece);
      const int64_t length = pieces.size(piece);
      for (int64_t j = 0; j < length; j += 16) {
        const __m512i bits = _mm512_maskz_loadu_epi32(tail_mask(length - j), in + j);
        local = _mm512_max_epu32(local, _mm512_and_si512(bits, magnitude));
      }
    }
    best = std::max(best, static_cast<uint32_t>(_mm512_reduce_max_epu32(local)));
  }
  return best;
}

float pow2(int64_t e) {  // fixed_point.pow2: exact for e in [-126, 127]
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Section 1's shared exponent from the largest magnitude's bits; 0 for an all-zero or
// non-finite tensor (fixed_point.shared_exponent).
int64_t shared_exponent(uint32_t top_bits, int64_t bits) {
  if (top_bits >= 0x7F800000u || top_bits == 0) return 0;
  float amax;
  std::memcpy(&amax, &top_bits, sizeof amax);
  int k;
  std::frexp(amax, &k);  // amax = f 2**k, f in [0.5, 1)
  return (k - 1) - (bits - 2);
}

// fixed_point.scale_by_pow2's two factors for 2**exponent, multiplied in this order.
struct Scale {
  __m512 first, second;
  explicit Scale(int64_t exponent) {
    const int64_t a = std::clamp<int64_t>(exponent, -126, 127);
    first = _mm512_set1_ps(pow2(a));
    second = _mm512_set1_ps(pow2(std::clamp<int64_t>(exponent - a, -126, 127)));
  }
  __m512 operator()(__m512 v) const { return _mm512_mul_ps(_mm512_mul_ps(v, first), second); }
};

// The draws of key ``key`` (rounding.random_bits): mix32(mix32(index ^ low) ^ high) >> 8.
struct Draws {
  __m512i low, high;
  explicit Draws(int64_t key)
      : low(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(key)))),
        high(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(static_cast<uint64_t>(key) >> 32)))) {}
  __m512i operator()(__m512i index) const {
    return _mm512_srli_epi32(mix32(_mm512_xor_si512(mix32(_mm512_xor_si512(index, low)), high)), 8);
  }
};

// rounding.round_float on 16 lanes, integer values kept in float32.
inline __m512 round_float(__m512 v, bool stochastic, const Draws& draws, __m512i index) {
  if (!stochastic) return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 floor = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512i threshold = _mm512_cvtps_epi32(_mm512_roundscale_ps(
      _mm512_mul_ps(_mm512_sub_ps(v, floor), _mm512_set1_ps(16777216.0f)), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
  const __mmask16 up = _mm512_cmplt_epi32_mask(draws(index), threshold);
  return _mm512_mask_add_ps(floor, up, floor, _mm512_set1_ps(1.0f));
}

}  // namespace

// (mantissas, exponent, clamps, finite) of float32 ``x`` at ``bits`` <= 8, as map_kernel. The
// last dimension of ``x`` is contiguous in memory; the mantissas come back dense, in x's order.
// ``transposed``: x holds the transpose of the tensor being mapped in its last two dimensions
// (map_transposed_kernel): elements draw with that tensor's row-major indices.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> map_int8(const torch::Tensor& x, int64_t bits,
                                                                                bool stochastic, int64_t key,
                                                                                bool transposed) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() >= 1 &&
                  (x.stride(-1) == 1 || x.size(-1) == 1),
              "a float32 CPU tensor whose last dimension is contiguous");
  TORCH_CHECK(bits >= 2 && bits <= 8 && x.numel() < (int64_t{1} << 31), "bits in [2, 8], fewer than 2**31 elements");
  TORCH_CHECK(!transposed || x.dim() >= 2, "a transposed tensor has two dimensions or more");
  const float* xp = x.data_ptr<float>();
  const Pieces pieces(x, transposed);
  auto mantissas = torch::empty(x.sizes(), x.options().dtype(torch::kInt8));
  int8_t* out = mantissas.data_ptr<int8_t>();
  // Piece p's first element draws with index start(p); along the piece the index grows by ``step``.
  const int64_t height = transposed ? x.size(-2) : 1, step = transposed ? height : 1;

  const uint32_t top_bits = largest_magnitude_bits(xp, pieces);
  const bool finite = top_bits < 0x7F800000u;
  const int64_t exponent = shared_exponent(top_bits, bits);
  const Scale scale(-exponent);
  const Draws draws(key);
  const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(static_cast<int>(step)));
  const int limit = (1 << (bits - 1)) - 1;
  const __m512i qmax = _mm512_set1_epi32(limit), qmin = _mm512_set1_epi32(-limit);

  int64_t clamps = 0;
  const int64_t per_block = pieces.per_block();
#pragma omp parallel for reduction(+ : clamps) schedule(static)
  for (int64_t first = 0; first < pieces.count; first += per_block) {
    int64_t local = 0;
    for (int64_t piece = first; piece < std::min(pieces.count, first + per_block); ++piece) {
    const float* in = xp + pieces.offset(piece);
    const int64_t length = pieces.size(piece), at = piece * pieces.length;
    int8_t* mapped = out + at;
    // transposed: row (batch, i) of x is column i of the mapped tensor's matrix ``batch``
    const int64_t start = transposed ? (piece / height) * height * length + piece % height : at;
    for (int64_t j = 0; j < length; j += 16) {
      const __mmask16 k = tail_mask(length - j);
      const __m512 v = scale(_mm512_maskz_loadu_ps(k, in + j));
      const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(start + j * step)), lanes);
      const __m512i q = _mm512_cvtps_epi32(round_float(v, stochastic, draws, index));
      const __mmask16 over = _mm512_cmpgt_epi32_mask(q, qmax) | _mm512_cmplt_epi32_mask(q, qmin);
      local += __builtin_popcount(static_cast<unsigned>(over & k));
      _mm512_mask_cvtepi32_storeu_epi8(mapped + j, k, _mm512_min_epi32(_mm512_max_epi32(q, qmin), qmax));
    }
    }
    clamps += local;
  }
  auto scalar = [](int64_t v, torch::ScalarType t) { return torch::scalar_tensor(v, torch::TensorOptions().dtype(t)); };
  return {mantissas, scalar(exponent, torch::kLong), scalar(clamps, torch::kLong), scalar(finite, torch::kBool)};
}

// ops/add.py's _add for two dense float32 CPU tensors of one shape: both mapped (keys[0],
// keys[1]), the finer shifted onto the coarser exponent and rounded again (keys[2] for a,
// keys[3] for b), summed and mapped back. Returns (sum, a finite, b finite, clamps).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> add_int8(const torch::Tensor& a,
                                                                                const torch::Tensor& b, int64_t bits,
                                                                                bool stochastic,
                                                                                std::vector<int64_t> keys) {
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == torch::kFloat && a.is_contiguous() && b.device().is_cpu() &&
                  b.scalar_type() == torch::kFloat && b.is_contiguous() && a.sizes() == b.sizes() && a.dim() >= 1,
              "two dense float32 CPU tensors of one shape");
  TORCH_CHECK(bits >= 2 && bits <= 16 && a.numel() < (int64_t{1} << 31) && keys.size() == 4,
              "bits in [2, 16], fewer than 2**31 elements, four keys");
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const int64_t n = a.numel();
  auto sum = torch::empty(a.sizes(), a.options());
  float* out = sum.data_ptr<float>();
  const Pieces pieces(a, false);
  const uint32_t top_a = largest_magnitude_bits(ap, pieces), top_b = largest_magnitude_bits(bp, pieces);
  const int64_t ea = shared_exponent(top_a, bits), eb = shared_exponent(top_b, bits);
  const int64_t exponent = std::max(ea, eb);
  const bool a_finer = ea < eb;
  const Scale scale_a(-ea), scale_b(-eb), onto_coarser(std::min(ea, eb) - exponent), back(exponent);
  const Draws draw_a(keys[0]), draw_b(keys[1]), draw_finer(a_finer ? keys[2] : keys[3]);
  const __m512 limit = _mm512_set1_ps(static_cast<float>((1 << (bits - 1)) - 1));
  const __m512 negative_limit = _mm512_set1_ps(-static_cast<float>((1 << (bits - 1)) - 1));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);

  int64_t clamps = 0;
#pragma omp parallel for reduction(+ : clamps) schedule(static)
  for (int64_t block = 0; block < n; block += kBlock) {
    const int64_t end = std::min(n, block + kBlock);
    int64_t local = 0;
    for (int64_t i = block; i < end; i += 16) {
      const __mmask16 k = tail_mask(end - i);
      const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i)), lanes);
      __m512 ma = round_float(scale_a(_mm512_maskz_loadu_ps(k, ap + i)), stochastic, draw_a, index);
      __m512 mb = round_float(scale_b(_mm512_maskz_loadu_ps(k, bp + i)), stochastic, draw_b, index);
      const __mmask16 over_a = _mm512_cmp_ps_mask(ma, limit, _CMP_GT_OQ) | _mm512_cmp_ps_mask(ma, negative_limit, _CMP_LT_OQ);
      const __mmask16 over_b = _mm512_cmp_ps_mask(mb, limit, _CMP_GT_OQ) | _mm512_cmp_ps_mask(mb, negative_limit, _CMP_LT_OQ);
      local += __builtin_popcount(static_cast<unsigned>(over_a & k)) + __builtin_popcount(static_cast<unsigned>(over_b & k));
      ma = _mm512_min_ps(_mm512_max_ps(ma, negative_limit), limit);
      mb = _mm512_min_ps(_mm512_max_ps(mb, negative_limit), limit);
      const __m512 finer = round_float(onto_coarser(a_finer ? ma : mb), stochastic, draw_finer, index);
      _mm512_mask_storeu_ps(out + i, k, back(_mm512_add_ps(finer, a_finer ? mb : ma)));
    }
    clamps += local;
  }
  auto flag = [](bool v) { return torch::scalar_tensor(v, torch::TensorOptions().dtype(torch::kBool)); };
  return {sum, flag(top_a < 0x7F800000u), flag(top_b < 0x7F800000u),
          torch::scalar_tensor(clamps, torch::TensorOptions().dtype(torch::kLong))};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("map_int8", &map_int8);
  m.def("add_int8", &add_int8);
}
