// Fused CPU kernels for the fast decode path (mlpo_agents/fast_decode.py), compiled on first use by
// mlpo_agents/kernels.py. Each one replaces several small torch ops of a Llama-family layer with one pass
// over rows of a few hundred values, rounding where torch rounds so that bf16 outputs match transformers'
// op-by-op results; decode attention reads each row's real keys and values only (no padding columns).
// Tensors are float32 or bfloat16; arithmetic is float32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// float32 and bfloat16 only (the engine's dtypes)
#define DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace {

// bf16 <-> float by bits: the same round-to-nearest-even as c10::BFloat16, written so loops vectorise.
inline float load(float x) { return x; }
inline float load(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
template <typename T>
inline T store(float x);
template <>
inline float store<float>(float x) { return x; }
template <>
inline at::BFloat16 store<at::BFloat16>(float x) {
  at::BFloat16 out;
  if (std::isnan(x)) {
    out.x = 0x7FC0;
    return out;
  }
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits += 0x7FFF + ((bits >> 16) & 1);
  out.x = static_cast<uint16_t>(bits >> 16);
  return out;
}
// exp(x) as 2^n * 2^f, f in [-1/2, 1/2], by its Taylor polynomial to degree 7 (error below float's rounding):
// plain arithmetic, so loops over it vectorise (std::exp does not, without -ffast-math).
inline float exp_(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  float t = x * 1.4426950408889634f, n = std::nearbyint(t), f = (t - n) * 0.6931471805599453f;
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
// torch's result of one op in dtype T: computed in float, rounded to T.
template <typename T>
inline float round_to(float x) { return load(store<T>(x)); }

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

// transformers' LlamaRMSNorm on one row: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)
template <typename T>
inline void rms_row(const T* x, const T* weight, T* out, int64_t n, float eps) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    float v = load(x[i]);
    sum += v * v;
  }
  float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = store<T>(load(weight[i]) * round_to<T>(load(x[i]) * inv));
}

// RMSNorm of every row of x (..., n).
at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& weight_, double eps) {
  check(x_, "x");
  auto x = x_.contiguous();
  auto weight = weight_.to(x.scalar_type()).contiguous();
  auto out = at::empty_like(x);
  int64_t n = x.size(-1), rows = x.numel() / n;
  DISPATCH(x.scalar_type(), "rms_norm", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pw = weight.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_row(px + r * n, pw, po + r * n, n, static_cast<float>(eps));
    });
  });
  return out;
}

// h += delta (rounded as torch's add), then RMSNorm of h: the residual add and the next norm in one pass.
at::Tensor add_rms_norm_(at::Tensor& h, const at::Tensor& delta_, const at::Tensor& weight_, double eps) {
  check(h, "h");
  TORCH_CHECK(h.is_contiguous(), "h must be contiguous");
  auto delta = delta_.to(h.scalar_type()).contiguous();
  TORCH_CHECK(delta.sizes() == h.sizes(), "delta must have h's shape");
  auto weight = weight_.to(h.scalar_type()).contiguous();
  auto out = at::empty_like(h);
  int64_t n = h.size(-1), rows = h.numel() / n;
  DISPATCH(h.scalar_type(), "add_rms_norm_", [&] {
    scalar_t* ph = h.data_ptr<scalar_t>();
    const scalar_t *pd = delta.data_ptr<scalar_t>(), *pw = weight.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = ph + r * n;
        const scalar_t* d = pd + r * n;
        for (int64_t i = 0; i < n; ++i) row[i] = store<scalar_t>(load(row[i]) + load(d[i]));
        rms_row(row, pw, po + r * n, n, static_cast<float>(eps));
      }
    });
  });
  return out;
}

template <typename T>
inline void silu_mul_row(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float g = load(gate[i]);
    out[i] = store<T>(round_to<T>(g / (1.f + exp_(-g))) * load(up[i]));
  }
}

// silu(gate) * up of (..., 2I) = [gate | up] -> (..., I), rounded after each op as torch does.
at::Tensor silu_mul(const at::Tensor& x_) {
  check(x_, "x");
  auto x = x_.contiguous();
  int64_t width = x.size(-1), inner = width / 2, rows = x.numel() / width;
  auto sizes = x.sizes().vec();
  sizes.back() = inner;
  auto out = at::empty(sizes, x.options());
  DISPATCH(x.scalar_type(), "silu_mul", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        silu_mul_row(px + r * width, px + r * width + inner, po + r * inner, inner);
      }
    });
  });
  return out;
}

// Split qkv (B, T, (H + 2 KV) * D) into q (B, H, T, D), k and v (B, KV, T, D), q and k rotated by cos and
// sin (B, T, D) as transformers' apply_rotary_pos_emb rounds: x * cos + rotate_half(x) * sin. The outputs
// may be strided views (k and v: the columns of a KV cache's buffer they are written into).
void rotary_split(const at::Tensor& qkv_, const at::Tensor& cos_, const at::Tensor& sin_, int64_t heads,
                  int64_t kv, at::Tensor& q, at::Tensor& k, at::Tensor& v) {
  check(qkv_, "qkv");
  auto qkv = qkv_.contiguous();
  auto cos = cos_.to(qkv.scalar_type()).contiguous(), sin = sin_.to(qkv.scalar_type()).contiguous();
  int64_t B = qkv.size(0), T = qkv.size(1), D = q.size(3), half = D / 2;
  TORCH_CHECK(qkv.size(2) == (heads + 2 * kv) * D, "qkv width must be (heads + 2 kv) * head_dim");
  TORCH_CHECK(cos.numel() == B * T * D && sin.numel() == B * T * D, "cos and sin must be (B, T, head_dim)");
  TORCH_CHECK(q.size(0) == B && q.size(1) == heads && q.size(2) == T && k.size(0) == B && k.size(1) == kv &&
                  k.size(2) == T && v.size(0) == B && v.size(1) == kv && v.size(2) == T,
              "q must be (B, heads, T, head_dim), k and v (B, kv, T, head_dim)");
  TORCH_CHECK(q.scalar_type() == qkv.scalar_type() && k.scalar_type() == qkv.scalar_type() &&
                  v.scalar_type() == qkv.scalar_type(), "q, k, v must have qkv's dtype");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "outputs' last dimension must be dense");
  DISPATCH(qkv.scalar_type(), "rotary_split", [&] {
    const scalar_t *px = qkv.data_ptr<scalar_t>(), *pc = cos.data_ptr<scalar_t>(), *ps = sin.data_ptr<scalar_t>();
    scalar_t *pq = q.data_ptr<scalar_t>(), *pk = k.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>();
    int64_t all = heads + 2 * kv;
    at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        int64_t b = bt / T, t = bt % T;
        const scalar_t *c = pc + bt * D, *s = ps + bt * D;
        for (int64_t head = 0; head < all; ++head) {
          const scalar_t* x = px + (bt * all + head) * D;
          scalar_t* o;
          if (head < heads)
            o = pq + b * q.stride(0) + head * q.stride(1) + t * q.stride(2);
          else if (head < heads + kv)
            o = pk + b * k.stride(0) + (head - heads) * k.stride(1) + t * k.stride(2);
          else {
            o = pv + b * v.stride(0) + (head - heads - kv) * v.stride(1) + t * v.stride(2);
            std::memcpy(o, x, D * sizeof(scalar_t));
            continue;
          }
          for (int64_t i = 0; i < D; ++i) {
            float rotated = i < half ? -load(x[i + half]) : load(x[i - half]);
            float a = round_to<scalar_t>(load(x[i]) * load(c[i]));
            float r = round_to<scalar_t>(rotated * load(s[i]));
            o[i] = store<scalar_t>(a + r);
          }
        }
      }
    });
  });
}

// G query heads (G, D) against n keys and values (rows `ks` / `vs` apart) of their shared KV head; out (G, D).
template <typename T>
void attend(const T* __restrict__ q, const T* __restrict__ k, int64_t ks, const T* __restrict__ v, int64_t vs,
            int64_t n, int64_t G, int64_t D, float scale, std::vector<float>& work, T* __restrict__ out) {
  work.resize(G * D * 2 + D + G * n + G);
  float *qf = work.data(), *acc = qf + G * D, *row = acc + G * D, *scores = row + D, *total = scores + G * n;
  for (int64_t i = 0; i < G * D; ++i) qf[i] = load(q[i]) * scale;
  for (int64_t j = 0; j < n; ++j) {
    const T* kj = k + j * ks;
    for (int64_t i = 0; i < D; ++i) row[i] = load(kj[i]);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      float dot = 0.f;
      for (int64_t i = 0; i < D; ++i) dot += qg[i] * row[i];
      scores[g * n + j] = dot;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * n;
    float top = sg[0];
    for (int64_t j = 1; j < n; ++j) top = sg[j] > top ? sg[j] : top;
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      float e = exp_(sg[j] - top);
      sum += e;
      sg[j] = round_to<T>(e);  // SDPA's rounding: bf16 weights times V, the fp32 sum divides after
    }
    total[g] = sum;
  }
  for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v + j * vs;
    for (int64_t i = 0; i < D; ++i) row[i] = load(vj[i]);
    for (int64_t g = 0; g < G; ++g) {
      float p = scores[g * n + j];
      float* ag = acc + g * D;
      for (int64_t i = 0; i < D; ++i) ag[i] += p * row[i];
    }
  }
  for (int64_t i = 0; i < G * D; ++i) out[i] = store<T>(acc[i] / total[i / D]);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
// `attend` with G and head_dim = 16 C known at compile time, q and the accumulators in AVX-512 registers: 2x
// the plain loops' speed (SmolLM2's G 3, C 4: 12.8 vs 27.9 ns a column, one thread).
template <typename T, int G, int C>
void attend_simd(const T* __restrict__ q, const T* __restrict__ k, int64_t ks, const T* __restrict__ v, int64_t vs,
                 int64_t n, float scale, std::vector<float>& work, T* __restrict__ out) {
  constexpr int D = 16 * C;
  work.resize(G * n);
  float* scores = work.data();
  __m512 qf[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) {
      alignas(64) float tmp[16];
      for (int i = 0; i < 16; ++i) tmp[i] = load(q[g * D + c * 16 + i]) * scale;
      qf[g][c] = _mm512_load_ps(tmp);
    }
  float top[G];
  for (int g = 0; g < G; ++g) top[g] = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const T* kj = k + j * ks;
    _mm_prefetch(reinterpret_cast<const char*>(kj + 16 * ks), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(kj + 16 * ks) + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + (j < 8 ? j : 0) * vs), _MM_HINT_T1);
    __m512 kc[C];
    for (int c = 0; c < C; ++c) kc[c] = load16(kj + c * 16);
    for (int g = 0; g < G; ++g) {
      __m512 acc = _mm512_mul_ps(qf[g][0], kc[0]);
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qf[g][c], kc[c], acc);
      float s = _mm512_reduce_add_ps(acc);
      scores[g * n + j] = s;
      top[g] = s > top[g] ? s : top[g];
    }
  }
  float total[G];
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * n;
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      float e = exp_(sg[j] - top[g]);
      sum += e;
      sg[j] = round_to<T>(e);  // SDPA's rounding: bf16 weights times V, the fp32 sum divides after
    }
    total[g] = sum;
  }
  __m512 acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v + j * vs;
    _mm_prefetch(reinterpret_cast<const char*>(vj + 16 * vs), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(vj + 16 * vs) + 64, _MM_HINT_T0);
    __m512 vc[C];
    for (int c = 0; c < C; ++c) vc[c] = load16(vj + c * 16);
    for (int g = 0; g < G; ++g) {
      __m512 p = _mm512_set1_ps(scores[g * n + j]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, vc[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, _mm512_div_ps(acc[g][c], _mm512_set1_ps(total[g])));
      for (int i = 0; i < 16; ++i) out[g * D + c * 16 + i] = store<T>(tmp[i]);
    }
}

// attend_simd for this G and head_dim, if instantiated; false otherwise.
template <typename T>
bool attend_fast(const T* q, const T* k, int64_t ks, const T* v, int64_t vs, int64_t n, int64_t G, int64_t D,
                 float scale, std::vector<float>& work, T* out) {
#define MLPO_CASE(g, c)                                          \
  if (G == g && D == 16 * c) {                                   \
    attend_simd<T, g, c>(q, k, ks, v, vs, n, scale, work, out);  \
    return true;                                                 \
  }
#define MLPO_CASES(c) MLPO_CASE(1, c) MLPO_CASE(2, c) MLPO_CASE(3, c) MLPO_CASE(4, c) MLPO_CASE(5, c) \
  MLPO_CASE(6, c) MLPO_CASE(7, c) MLPO_CASE(8, c)
  MLPO_CASES(4)
  MLPO_CASES(8)
#undef MLPO_CASES
#undef MLPO_CASE
  return false;
}
#else
template <typename T>
bool attend_fast(const T*, const T*, int64_t, const T*, int64_t, int64_t, int64_t, int64_t, float,
                 std::vector<float>&, T*) {
  return false;
}
#endif

// One query token per row against its row's keys and values from column start[b] on (left padding
// skipped): q (B, H, 1, D), k and v (B, KV, L, D) with a dense last dimension, H a multiple of KV (grouped
// query attention). Returns (B, 1, H * D), the layout the output projection takes. Float32 softmax.
at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& start_, double scale) {
  check(q_, "q");
  auto q = q_.contiguous();
  auto start = start_.to(at::kLong).contiguous();
  int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), L = k.size(2), G = H / KV;
  TORCH_CHECK(q.size(2) == 1, "decode_attention takes one query token per row");
  TORCH_CHECK(H % KV == 0 && k.size(0) == B && v.size(0) == B && v.size(2) == L, "q, k, v shapes disagree");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k and v need a dense last dimension");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v dtypes differ");
  auto out = at::empty({B, 1, H * D}, q.options());
  const int64_t* first = start.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(first[b] >= 0 && first[b] < L, "start out of range");
  DISPATCH(q.scalar_type(), "decode_attention", [&] {
    const scalar_t *pq = q.data_ptr<scalar_t>(), *pk = k.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    int64_t kb = k.stride(0), kh = k.stride(1), kl = k.stride(2), vb = v.stride(0), vh = v.stride(1), vl = v.stride(2);
    // Each thread gets a contiguous run of (row, KV head) tasks with an equal share of the columns to read:
    // rows' lengths differ widely, and an even split by task count left one thread with most of the work.
    int64_t tasks = B * KV, threads = std::min<int64_t>(at::get_num_threads(), tasks), total = 0, done = 0;
    for (int64_t b = 0; b < B; ++b) total += (L - first[b]) * KV;
    std::vector<int64_t> bounds(threads + 1, tasks);
    bounds[0] = 0;
    for (int64_t task = 0, part = 1; task < tasks && part < threads; ++task) {
      done += L - first[task / KV];
      if (done * threads >= total * part) bounds[part++] = task + 1;
    }
    at::parallel_for(0, threads, 1, [&](int64_t part_begin, int64_t part_end) {
      std::vector<float> work;
      for (int64_t task = bounds[part_begin]; task < bounds[part_end]; ++task) {
        int64_t b = task / KV, head = task % KV, s0 = first[b];
        const scalar_t *qs = pq + (b * H + head * G) * D, *ks = pk + b * kb + head * kh + s0 * kl,
                       *vs = pv + b * vb + head * vh + s0 * vl;
        scalar_t* os = po + (b * H + head * G) * D;
        float sc = static_cast<float>(scale);
        if (!attend_fast<scalar_t>(qs, ks, kl, vs, vl, L - s0, G, D, sc, work, os))
          attend<scalar_t>(qs, ks, kl, vs, vl, L - s0, G, D, sc, work, os);
      }
    });
  });
  return out;
}

// Row sources[i] of every buffer (R, H, C, D) becomes its row rows[i], columns [start, end) only: a KV cache's
// finished rows replaced by its last ones, every layer's keys and values in one call.
void copy_rows(const std::vector<at::Tensor>& buffers, const std::vector<int64_t>& rows,
               const std::vector<int64_t>& sources, int64_t start, int64_t end) {
  TORCH_CHECK(rows.size() == sources.size(), "rows and sources differ in length");
  int64_t pairs = rows.size();
  if (buffers.empty() || pairs == 0 || end <= start) return;
  for (const auto& b : buffers) {
    check(b, "buffer");
    TORCH_CHECK(b.dim() == 4 && b.is_contiguous(), "buffers must be contiguous (R, H, C, D)");
    TORCH_CHECK(end <= b.size(2) && start >= 0, "columns out of range");
    for (int64_t i = 0; i < pairs; ++i)
      TORCH_CHECK(rows[i] >= 0 && rows[i] < b.size(0) && sources[i] >= 0 && sources[i] < b.size(0), "row out of range");
  }
  int64_t heads = buffers[0].size(1), count = buffers.size();
  at::parallel_for(0, count * pairs * heads, 1, [&](int64_t begin, int64_t stop) {
    for (int64_t task = begin; task < stop; ++task) {
      const at::Tensor& b = buffers[task / (pairs * heads)];
      int64_t pair = task / heads % pairs, head = task % heads, item = b.element_size();
      char* base = static_cast<char*>(b.data_ptr());
      int64_t width = (end - start) * b.size(3) * item, offset = (head * b.stride(1) + start * b.stride(2)) * item;
      std::memcpy(base + rows[pair] * b.stride(0) * item + offset, base + sources[pair] * b.stride(0) * item + offset,
                  width);
    }
  });
}


float row_max(const float* __restrict__ x, int64_t n) {
  constexpr int64_t lanes = 16;  // one running maximum per lane: a select per element, which vectorises
  float lane[lanes];
  for (int64_t l = 0; l < lanes; ++l) lane[l] = x[0];
  int64_t whole = n / lanes * lanes;
  for (int64_t i = 0; i < whole; i += lanes)
    for (int64_t l = 0; l < lanes; ++l) lane[l] = x[i + l] > lane[l] ? x[i + l] : lane[l];
  float top = x[0];
  for (int64_t l = 0; l < lanes; ++l) top = lane[l] > top ? lane[l] : top;
  for (int64_t i = whole; i < n; ++i) top = x[i] > top ? x[i] : top;
  return top;
}

// sum of exp((x - top) * scale) over n floats
float sum_exp(const float* __restrict__ x, int64_t n, float top, float scale) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += exp_((x[i] - top) * scale);
  return sum;
}

// The K largest of x (n floats), as (value, index) sorted descending, lower index first among equal values.
// Blocks of 64 whose maximum cannot enter are skipped after one vectorised max, so a peaked row costs about
// one pass over it.
void top_k(const float* x, int64_t n, int64_t k, std::vector<std::pair<float, int64_t>>& out) {
  auto worse = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };  // heap order: the worst kept pair on top
  out.clear();
  for (int64_t i = 0; i < std::min(k, n); ++i) {
    out.emplace_back(x[i], i);
    std::push_heap(out.begin(), out.end(), worse);
  }
  constexpr int64_t block = 64;
  for (int64_t start = out.size(); start < n; start += block) {
    int64_t end = std::min(n, start + block);
    if (!(row_max(x + start, end - start) > out.front().first)) continue;
    for (int64_t i = start; i < end; ++i) {
      if (x[i] > out.front().first) {  // a later equal value has a larger index: never better
        std::pop_heap(out.begin(), out.end(), worse);
        out.back() = {x[i], i};
        std::push_heap(out.begin(), out.end(), worse);
      }
    }
  }
  std::sort_heap(out.begin(), out.end(), worse);
}

// One decode step's draw for every row of logits (B, V) float32, as sampling.sample_tokens defines it:
// temperature 0 takes the argmax; otherwise inverse-CDF sampling with the row's uniform over the whole
// vocabulary (top_p >= 1, vocabulary order) or over the nucleus among the k most likely tokens. Returns
// (tokens, raw logprobs, temperature-scaled logprobs, full): `full` marks a top-p row whose k candidates hold
// less than top_p of the mass, for the caller to draw from a full sort instead.
std::vector<at::Tensor> sample_rows(const at::Tensor& logits_, const at::Tensor& temps_, const at::Tensor& top_ps_,
                                    const at::Tensor& uniforms_, int64_t k) {
  TORCH_CHECK(logits_.dim() == 2 && logits_.scalar_type() == at::kFloat && logits_.device().is_cpu(),
              "logits must be a (B, V) float32 CPU tensor");
  auto logits = logits_.contiguous();
  auto temps = temps_.to(at::kFloat).contiguous(), top_ps = top_ps_.to(at::kFloat).contiguous();
  auto uniforms = uniforms_.to(at::kFloat).contiguous();
  int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(temps.numel() == B && top_ps.numel() == B && uniforms.numel() == B, "one setting per row");
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto raw = at::empty({B}, logits.options()), scaled = at::empty({B}, logits.options());
  auto full = at::zeros({B}, logits.options().dtype(at::kBool));
  const float *px = logits.data_ptr<float>(), *pt = temps.data_ptr<float>(), *pp = top_ps.data_ptr<float>(),
              *pu = uniforms.data_ptr<float>();
  int64_t* ptok = tokens.data_ptr<int64_t>();
  float *praw = raw.data_ptr<float>(), *pscaled = scaled.data_ptr<float>();
  bool* pfull = full.data_ptr<bool>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, int64_t>> candidates;
    for (int64_t r = begin; r < end; ++r) {
      const float* x = px + r * V;
      float top = row_max(x, V), t = pt[r], inv = t > 0 ? 1.f / t : 0.f;
      float sum_raw = sum_exp(x, V, top, 1.f), sum_scaled = t > 0 ? sum_exp(x, V, top, inv) : sum_raw;
      int64_t token = 0;
      if (t <= 0) {
        while (x[token] != top) ++token;  // the first maximum, as argmax takes it
      } else if (pp[r] >= 1.f) {
        float target = pu[r] * sum_scaled, cdf = 0.f;
        token = V - 1;
        for (int64_t i = 0; i < V; ++i) {
          cdf += exp_((x[i] - top) * inv);
          if (cdf >= target) {
            token = i;
            break;
          }
        }
      } else {
        top_k(x, V, k, candidates);
        int64_t n = candidates.size();
        std::vector<float> probs(n);
        float mass = 0.f, kept = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          float p = exp_((candidates[j].first - top) * inv) / sum_scaled;
          probs[j] = mass < pp[r] ? p : 0.f;  // the nucleus: the mass before a token is below top_p
          kept += probs[j];
          mass += p;
        }
        pfull[r] = mass < pp[r] && n < V;
        float target = pu[r] * kept, cdf = 0.f;
        token = candidates[n - 1].second;
        for (int64_t j = 0; j < n; ++j) {
          cdf += probs[j];
          if (cdf >= target) {
            token = candidates[j].second;
            break;
          }
        }
      }
      ptok[r] = token;
      praw[r] = x[token] - top - std::log(sum_raw);
      pscaled[r] = t > 0 ? (x[token] - top) * inv - std::log(sum_scaled) : praw[r];
    }
  });
  return {tokens, raw, scaled, full};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of every row (transformers' rounding)");
  m.def("add_rms_norm_", &add_rms_norm_, "h += delta in place, then RMSNorm of h");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up]");
  m.def("rotary_split", &rotary_split, "qkv -> rotated q, rotated k, v, written into the given outputs");
  m.def("sample_rows", &sample_rows, "one token per row: greedy, whole-vocabulary or top-p inverse-CDF draws");
  m.def("copy_rows", &copy_rows, "rows of every buffer replaced by other rows, some columns only");
  m.def("decode_attention", &decode_attention, "one query token per row over its real keys and values");
}
