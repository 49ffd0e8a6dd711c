// The fixed-point mapping of a dense float32 CPU tensor to int8 mantissas, in AVX-512 code.
//
// It computes exactly the bits of fixed_point.map_kernel (the definition, and inductor's kernel
// on other devices): the shared exponent from the largest magnitude, x * 2**-exponent in the same
// two float32 multiplies, then stochastic rounding with the counter-based draws of rounding.py
// (element i of key (high, low) draws mix32(mix32(i ^ low) ^ high) >> 8) or round half to even,
// clamped to +-qmax. Written by hand because inductor's vector code for the draws took twice as
// long: it builds each vector of element indices lane by lane and converts through masks and
// floats, where this code adds a constant vector and compares integers (0.22 against 0.59 ms for
// a 64x65x192 tensor on a 2-core Xeon, 2026-12-03).
#include <torch/extension.h>

#include <immintrin.h>
#include <omp.h>

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

// Where x's rows (its last dimension, contiguous in memory) start: x may be a strided view
// (attention's heads, a transposed key); the mapping reads it in place.
struct Rows {
  std::vector<int64_t> sizes, strides;  // of the dimensions before the last
  int64_t length = 0, count = 1;

  explicit Rows(const torch::Tensor& x) : length(x.size(-1)) {
    for (int64_t d = 0; d + 1 < x.dim(); ++d) {
      sizes.push_back(x.size(d));
      strides.push_back(x.stride(d));
      count *= x.size(d);
    }
  }
  int64_t offset(int64_t row) const {
    int64_t at = 0;
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      at += (row % sizes[d]) * strides[d];
      row /= sizes[d];
    }
    return at;
  }
};

// The largest |x| as float bits: non-negative floats order as their bit patterns, and a NaN or
// infinity has bits at or above 0x7F800000, so one integer maximum also says "all finite".
uint32_t largest_magnitude_bits(const float* x, const Rows& rows) {
  uint32_t best = 0;
  const int64_t per_block = std::max<int64_t>(1, kBlock / std::max<int64_t>(rows.length, 1));
#pragma omp parallel for reduction(max : best) schedule(static)
  for (int64_t first = 0; first < rows.count; first += per_block) {
    __m512i local = _mm512_setzero_si512();
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    for (int64_t row = first; row < std::min(rows.count, first + per_block); ++row) {
      const float* in = x + rows.offset(row);
      for (int64_t j = 0; j < rows.length; j += 16) {
        const __m512i bits = _mm512_maskz_loadu_epi32(tail_mask(rows.length - j), in + j);
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
  const Rows rows(x);
  auto mantissas = torch::empty(x.sizes(), x.options().dtype(torch::kInt8));
  int8_t* out = mantissas.data_ptr<int8_t>();
  // Row r's first element draws with index start(r); along the row the index grows by ``step``.
  const int64_t length = rows.length, height = transposed ? x.size(-2) : 1;
  const int64_t step = transposed ? height : 1;

  const uint32_t top_bits = largest_magnitude_bits(xp, rows);
  const bool finite = top_bits < 0x7F800000u;
  int64_t exponent = 0;
  if (finite && top_bits > 0) {
    float amax;
    std::memcpy(&amax, &top_bits, sizeof amax);
    int k;
    std::frexp(amax, &k);  // amax = f 2**k, f in [0.5, 1)
    exponent = (k - 1) - (bits - 2);
  }
  // scale_by_pow2(x, -exponent): two factors, multiplied in this order
  const int64_t first = std::clamp<int64_t>(-exponent, -126, 127);
  const int64_t second = std::clamp<int64_t>(-exponent - first, -126, 127);
  const __m512 f1 = _mm512_set1_ps(pow2(first)), f2 = _mm512_set1_ps(pow2(second));
  const __m512 two24 = _mm512_set1_ps(16777216.0f);
  const __m512i low = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(key)));
  const __m512i high = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(static_cast<uint64_t>(key) >> 32)));
  const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(static_cast<int>(step)));
  const int limit = (1 << (bits - 1)) - 1;
  const __m512i qmax = _mm512_set1_epi32(limit), qmin = _mm512_set1_epi32(-limit), one = _mm512_set1_epi32(1);

  int64_t clamps = 0;
  const int64_t per_block = std::max<int64_t>(1, kBlock / std::max<int64_t>(length, 1));
#pragma omp parallel for reduction(+ : clamps) schedule(static)
  for (int64_t first = 0; first < rows.count; first += per_block) {
    int64_t local = 0;
    for (int64_t row = first; row < std::min(rows.count, first + per_block); ++row) {
    const float* in = xp + rows.offset(row);
    int8_t* mapped = out + row * length;
    // transposed: row (batch, i) of x is column i of the mapped tensor's matrix ``batch``
    const int64_t start = transposed ? (row / height) * height * length + row % height : row * length;
    for (int64_t j = 0; j < length; j += 16) {
      const __mmask16 k = tail_mask(length - j);
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, in + j), f1), f2);
      __m512i q;
      if (stochastic) {
        // floor(v) + [r < ceil(frac(v) 2**24)], r the element's 24 random bits
        const __m512 floor = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        const __m512i threshold = _mm512_cvtps_epi32(_mm512_roundscale_ps(
            _mm512_mul_ps(_mm512_sub_ps(v, floor), two24), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
        const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(start + j * step)), lanes);
        const __m512i r = _mm512_srli_epi32(mix32(_mm512_xor_si512(mix32(_mm512_xor_si512(index, low)), high)), 8);
        q = _mm512_cvtps_epi32(floor);
        q = _mm512_mask_add_epi32(q, _mm512_cmplt_epi32_mask(r, threshold), q, one);
      } else {
        q = _mm512_cvtps_epi32(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("map_int8", &map_int8); }
