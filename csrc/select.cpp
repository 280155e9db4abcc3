// Magnitude thresholds: the k-th largest |W| of the layer, or of each row, by radix select.
//
// For non-negative IEEE floats the bit pattern orders exactly like the value, so the
// k-th largest |w| is the k-th largest key `bits(|w|)` (the float's bits with the sign
// cleared; bf16 / fp16 are widened to fp32 first, exactly). A radix select reads those
// keys a digit at a time from the top: histogram the digit, find the bucket holding the
// k-th largest, keep only the keys in that bucket, repeat on the next digit. Each digit
// is a plain counting pass (no sort, no comparisons of floats), and after the first one
// only a few percent of the keys remain. torch.kthvalue on the other hand copies and
// partially sorts all values (about 24 ms for 1M fp32 here; this is under 1 ms).
//
// Large layers (per-layer threshold): a 16-bit first digit histogrammed in parallel (one
// histogram per thread), then a parallel pass collecting the keys of the selected bucket
// (a compare per key, few keys kept), then the rest serially on those candidates. From
// the second call on the same weight, one pass usually suffices: see hinted_kth_largest.
// Per-row thresholds run one row per task, radix select on the row.
#include "select.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

namespace vcon {
namespace {

// Keys of fp64 weights (and of fp64 keys) are 64-bit, all others 32-bit.
template <typename T>
using key_t = std::conditional_t<std::is_same_v<T, double> || std::is_same_v<T, uint64_t>, uint64_t, uint32_t>;

template <typename T>
inline key_t<T> abs_key(T x) {
  if constexpr (std::is_same_v<T, double>) {
    uint64_t b;
    std::memcpy(&b, &x, sizeof(b));
    return b & 0x7fffffffffffffffULL;
  } else {
    const float f = static_cast<float>(x);
    uint32_t b;
    std::memcpy(&b, &f, sizeof(b));
    return b & 0x7fffffffu;
  }
}

// Identity "conversion" so histogram/collect also run over keys already extracted.
inline uint32_t abs_key(uint32_t key) {
  return key;
}
inline uint64_t abs_key(uint64_t key) {
  return key;
}

template <typename U>
inline auto key_value(U key) {
  if constexpr (std::is_same_v<U, uint64_t>) {
    double v;
    std::memcpy(&v, &key, sizeof(v));
    return v;
  } else {
    float v;
    std::memcpy(&v, &key, sizeof(v));
    return v;
  }
}

// Bits that vary in a key: everything below the (cleared) sign bit.
template <typename U>
constexpr int kKeyBits = static_cast<int>(sizeof(U)) * 8 - 1;

// Histogram of digit (key >> shift) & (bins - 1) of the keys of w[0, n), added to `hist`.
// Two interleaved sub-histograms: consecutive equal digits (common: most weights share a
// few exponents) would otherwise chain each increment on the store of the previous one.
template <typename T>
void histogram(const T* w, int64_t n, int shift, uint32_t bins, uint32_t* hist, uint32_t* spare) {
  std::fill(spare, spare + bins, 0u);
  const uint32_t mask = bins - 1;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    hist[(abs_key(w[i]) >> shift) & mask]++;
    spare[(abs_key(w[i + 1]) >> shift) & mask]++;
  }
  for (; i < n; ++i) {
    hist[(abs_key(w[i]) >> shift) & mask]++;
  }
  for (uint32_t b = 0; b < bins; ++b) {
    hist[b] += spare[b];
  }
}

// The bucket holding the k-th largest key, and how many keys lie in higher buckets.
inline std::pair<uint32_t, int64_t> find_bucket(const uint32_t* hist, uint32_t bins, int64_t k) {
  int64_t above = 0;
  for (uint32_t b = bins; b-- > 0;) {
    if (above + hist[b] >= k) {
      return {b, above};
    }
    above += hist[b];
  }
  return {0, above};  // unreachable for 1 <= k <= n
}

// Appends the keys of w[0, n) whose digit is `bucket` to out (room for their count + 1):
// branch-free, as the test is true for an unpredictable few percent of the entries.
template <typename T>
int64_t collect(const T* w, int64_t n, int shift, uint32_t mask, uint32_t bucket, key_t<T>* out) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const key_t<T> key = abs_key(w[i]);
    out[m] = key;
    m += ((key >> shift) & mask) == bucket;
  }
  return m;
}

// The k-th largest (1 <= k <= n) of keys[0, n) whose bits at and above `hi` are all equal.
// `keys` is reordered and overwritten; `hist` holds at least 2 * 2048 counters.
template <typename U>
U select_kth_largest(U* keys, int64_t n, int64_t k, int hi, uint32_t* hist) {
  while (true) {
    if (n <= 64) {
      std::nth_element(keys, keys + (k - 1), keys + n, std::greater<U>());
      return keys[k - 1];
    }
    // Small inputs use 8-bit digits: clearing 2048 counters would cost more than the keys.
    const int width = std::min(n < 16384 ? 8 : 11, hi);
    const int shift = hi - width;
    const uint32_t bins = 1u << width;
    std::fill(hist, hist + bins, 0u);
    histogram(keys, n, shift, bins, hist, hist + bins);
    const auto [bucket, above] = find_bucket(hist, bins, k);
    k -= above;
    n = collect(keys, n, shift, bins - 1, bucket, keys);
    hi = shift;
    if (hi == 0) {
      return keys[0];  // every remaining key is equal
    }
  }
}

template <typename T>
key_t<T> layer_kth_largest(const T* w, int64_t n, int64_t k) {
  using U = key_t<T>;
  // A 16-bit first digit (sign-cleared exponent and 7 or 4 mantissa bits): one bucket
  // then holds ~0.1% of Gaussian-like weights, so the second pass mostly just compares.
  constexpr int kFirst = 16;
  constexpr uint32_t kBins = 1u << kFirst;
  constexpr int64_t kBlock = 32;
  const int shift = kKeyBits<U> - kFirst;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n >> 15));
  const int64_t per = (n + chunks - 1) / chunks;
  std::vector<uint32_t> hists(chunks * kBins, 0u);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      uint32_t* h = hists.data() + c * kBins;
      const int64_t end = std::min(n, (c + 1) * per);
      for (int64_t i = c * per; i < end; ++i) {
        h[abs_key(w[i]) >> shift]++;
      }
    }
  });
  std::vector<uint32_t> total(hists.begin(), hists.begin() + kBins);
  for (int64_t c = 1; c < chunks; ++c) {
    for (uint32_t b = 0; b < kBins; ++b) {
      total[b] += hists[c * kBins + b];
    }
  }
  const auto [bucket, above] = find_bucket(total.data(), kBins, k);
  // Second pass: each chunk collects its keys of that bucket at its offset (counts known).
  std::vector<int64_t> offset(chunks + 1, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    offset[c + 1] = offset[c] + hists[c * kBins + bucket];
  }
  std::vector<U> candidates(offset[chunks] + kBlock);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const U b = bucket;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * per, end = std::min(n, begin + per);
      std::vector<U> part(offset[c + 1] - offset[c] + kBlock);
      int64_t m = 0;
      for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
        const int64_t len = std::min(end - i0, kBlock);
        uint32_t hits = 0;  // vectorizes: most blocks hold no key of the bucket
        for (int64_t i = 0; i < len; ++i) {
          hits += (abs_key(w[i0 + i]) >> shift) == b;
        }
        if (hits) {
          for (int64_t i = 0; i < len; ++i) {
            const U key = abs_key(w[i0 + i]);
            part[m] = key;
            m += (key >> shift) == b;
          }
        }
      }
      std::copy(part.begin(), part.begin() + m, candidates.begin() + offset[c]);
    }
  });
  return select_kth_largest(candidates.data(), offset[chunks], k - above, shift, total.data());
}

// -- the one-pass path, from a hint ----------------------------------------------------------------
// One parallel pass: the number of keys above `hi`, and the keys in [lo, hi].
template <typename T>
std::pair<int64_t, std::vector<key_t<T>>> count_and_bracket(const T* w, int64_t n, const key_t<T> lo,
                                                            const key_t<T> hi) {
  using U = key_t<T>;
  constexpr int64_t kBlock = 32;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n >> 15));
  const int64_t per = (n + chunks - 1) / chunks;
  std::vector<int64_t> above(chunks, 0);
  std::vector<std::vector<U>> inside(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const U lo_ = lo, hi_ = hi;  // locals, so the compiler keeps them in registers
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * per, end = std::min(n, begin + per);
      std::vector<U> out(256);
      int64_t m = 0, count = 0;
      // Blocks of 32: the two counts vectorize; the rare blocks holding a key of the
      // bracket are collected by a second, branch-free look.
      for (int64_t b = begin; b < end; b += kBlock) {
        const int64_t len = std::min(end - b, kBlock);
        uint32_t gt = 0, in = 0;
        for (int64_t i = 0; i < len; ++i) {
          const U key = abs_key(w[b + i]);
          gt += key > hi_;
          in += (key >= lo_) & (key <= hi_);
        }
        count += gt;
        if (in) {
          if (m + kBlock + 1 > static_cast<int64_t>(out.size())) {
            out.resize(2 * out.size());
          }
          U* dst = out.data();
          for (int64_t i = 0; i < len; ++i) {
            const U key = abs_key(w[b + i]);
            dst[m] = key;
            m += (key >= lo_) & (key <= hi_);
          }
        }
      }
      out.resize(m);
      inside[c] = std::move(out);
      above[c] = count;
    }
  });
  int64_t total_above = 0;
  size_t total_inside = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    total_above += above[c];
    total_inside += inside[c].size();
  }
  std::vector<U> candidates;
  candidates.reserve(total_inside + 1);
  for (auto& part : inside) {
    candidates.insert(candidates.end(), part.begin(), part.end());
  }
  return {total_above, std::move(candidates)};
}

// The last per-layer threshold of each weight, by address, size, dtype and kept count.
// Training moves the k-th largest |w| of a layer by far less than 0.1% per step, so the
// next threshold lies in a narrow bracket around the last one, and one pass that counts
// the keys above the bracket and collects the few inside it finds it exactly. The cache
// only saves time: the counts prove the answer lies in the bracket (above < k <= above +
// inside), and when they do not, the exact two-pass path runs. Bracket half-width:
// 8x the last move, between 1e-5 and 2% of the value; widened 4x after a miss.
struct HintKey {
  const void* ptr;
  int64_t n;
  int64_t k;
  int dtype;
  bool operator==(const HintKey& o) const { return ptr == o.ptr && n == o.n && k == o.k && dtype == o.dtype; }
};

struct HintKeyHash {
  size_t operator()(const HintKey& h) const {
    return std::hash<const void*>()(h.ptr) ^ (std::hash<int64_t>()(h.n) * 31) ^ (std::hash<int64_t>()(h.k) * 131);
  }
};

struct Hint {
  double value;
  double width;  // relative half-width of the next bracket
};

constexpr double kMinWidth = 1e-5, kFirstWidth = 1e-3, kMaxWidth = 0.02;

std::mutex g_hint_mutex;
std::unordered_map<HintKey, Hint, HintKeyHash> g_hints;
std::atomic<int64_t> g_hint_hits{0}, g_hint_misses{0};

std::optional<Hint> find_hint(const HintKey& key) {
  std::lock_guard<std::mutex> lock(g_hint_mutex);
  auto it = g_hints.find(key);
  if (it == g_hints.end()) {
    return std::nullopt;
  }
  return it->second;
}

void store_hint(const HintKey& key, Hint hint) {
  std::lock_guard<std::mutex> lock(g_hint_mutex);
  if (g_hints.size() >= 4096 && g_hints.find(key) == g_hints.end()) {
    g_hints.clear();  // a bound, not an LRU: models have far fewer layers than this
  }
  g_hints[key] = hint;
}

template <typename T>
key_t<T> hinted_kth_largest(const T* w, int64_t n, int64_t k, int dtype) {
  using C = compute_type_of<T>;
  using U = key_t<T>;
  const HintKey hkey{w, n, k, dtype};
  const std::optional<Hint> hint = find_hint(hkey);
  if (hint) {
    const C lo_value = static_cast<C>(hint->value * (1.0 - hint->width));
    const C hi_value = static_cast<C>(hint->value * (1.0 + hint->width));
    auto [above, candidates] = count_and_bracket(w, n, abs_key(lo_value), abs_key(hi_value));
    const int64_t m = static_cast<int64_t>(candidates.size());
    if (above < k && k <= above + m) {
      uint32_t hist[2 * 2048];
      const U key = select_kth_largest(candidates.data(), m, k - above, kKeyBits<U>, hist);
      const double value = static_cast<double>(key_value(key));
      const double moved = hint->value > 0 ? std::abs(value - hint->value) / hint->value : 0.0;
      store_hint(hkey, Hint{value, std::min(kMaxWidth, std::max(kMinWidth, 8.0 * moved))});
      g_hint_hits++;
      return key;
    }
    g_hint_misses++;
  }
  const U key = layer_kth_largest(w, n, k);
  const double width = hint ? std::min(kMaxWidth, 4.0 * hint->width) : kFirstWidth;
  store_hint(hkey, Hint{static_cast<double>(key_value(key)), width});
  return key;
}

template <typename T>
void thresholds(const T* w, int64_t rows, int64_t cols, int64_t k, bool per_row, int dtype, compute_type_of<T>* out) {
  using C = compute_type_of<T>;
  using U = key_t<T>;
  if (k == 0) {  // nothing kept: no |w| reaches +inf
    std::fill(out, out + (per_row ? rows : 1), std::numeric_limits<C>::infinity());
    return;
  }
  if (!per_row) {
    const int64_t n = rows * cols;
    if (n >= (int64_t(1) << 16)) {
      out[0] = key_value(hinted_kth_largest(w, n, k, dtype));
      return;
    }
  }
  // Rows one by one (or the small layer as one row): histogram the first digit straight
  // from the weights, collect that bucket's keys, finish on those.
  const int64_t len = per_row ? cols : rows * cols;
  const int64_t count = per_row ? rows : 1;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1));
  at::parallel_for(0, count, grain, [&](int64_t r0, int64_t r1) {
    constexpr int kFirst = 10;
    constexpr uint32_t kBins = 1u << kFirst;
    const int shift = kKeyBits<U> - kFirst;
    std::vector<U> keys(len + 1);
    std::vector<uint32_t> hist(2 * 2048);
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = w + r * len;
      std::fill(hist.begin(), hist.begin() + kBins, 0u);
      histogram(row, len, shift, kBins, hist.data(), hist.data() + kBins);
      const auto [bucket, above] = find_bucket(hist.data(), kBins, k);
      const int64_t m = collect(row, len, shift, kBins - 1, bucket, keys.data());
      out[r] = key_value(select_kth_largest(keys.data(), m, k - above, shift, hist.data()));
    }
  });
}

}  // namespace

std::pair<int64_t, int64_t> threshold_hint_stats() {
  return {g_hint_hits.load(), g_hint_misses.load()};
}

void clear_threshold_hints() {
  std::lock_guard<std::mutex> lock(g_hint_mutex);
  g_hints.clear();
  g_hint_hits = 0;
  g_hint_misses = 0;
}

void magnitude_thresholds(const at::Tensor& weight, int64_t kept, bool per_row, at::Tensor& out) {
  const int64_t rows = weight.size(0);
  const int64_t cols = weight.size(1);
  TORCH_CHECK(kept >= 0 && kept <= (per_row ? cols : rows * cols), "vcon_kernels._C: kept count ", kept,
              " out of range for a (", rows, ", ", cols, ") weight");
  switch (weight.scalar_type()) {
    case at::kFloat:
      thresholds(weight.data_ptr<float>(), rows, cols, kept, per_row, 0, out.data_ptr<float>());
      break;
    case at::kDouble:
      thresholds(weight.data_ptr<double>(), rows, cols, kept, per_row, 1, out.data_ptr<double>());
      break;
    case at::kBFloat16:
      thresholds(weight.data_ptr<at::BFloat16>(), rows, cols, kept, per_row, 2, out.data_ptr<float>());
      break;
    case at::kHalf:
      thresholds(weight.data_ptr<at::Half>(), rows, cols, kept, per_row, 3, out.data_ptr<float>());
      break;
    default:
      TORCH_CHECK(false, "vcon_kernels._C: weight dtype must be float32, float64, bfloat16 or float16, got ",
                  weight.scalar_type());
  }
}

}  // namespace vcon
