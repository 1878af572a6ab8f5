// Nearest-centroid assignment on CPU, fp32, for vmq's k-means (vmq/ops/kmeans.py).
//
// For every point x_i (D values, optional per-coordinate weights w_i) the distance
//   sum_j w_ij (x_ij - c_kj)^2 = sum_j w_ij x_ij^2 + sum_j (w_ij c_kj^2 - 2 w_ij x_ij c_kj)
// to every centroid c_k is accumulated over a block of centroids at a time (the centroids are
// transposed to (D, K) so the inner loop runs over contiguous centroids and vectorizes) and
// folded into a running minimum: no N x K matrix exists, and a block stays in L1.
// Ties go to the lowest centroid index. Points are split over threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;  // centroids per block

std::tuple<at::Tensor, at::Tensor> kmeans_assign(const at::Tensor& x, const at::Tensor& w, const at::Tensor& c) {
  TORCH_CHECK(x.device().is_cpu() && c.device().is_cpu(), "kmeans_assign: CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat, "kmeans_assign: float32 expected");
  TORCH_CHECK(x.dim() == 2 && c.dim() == 2 && x.size(1) == c.size(1),
              "kmeans_assign: points (N, D) and centroids (K, D) expected");
  TORCH_CHECK(c.size(0) >= 1, "kmeans_assign: at least one centroid");
  const bool weighted = w.numel() > 0;
  if (weighted) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.sizes() == x.sizes(), "kmeans_assign: weights shaped like points");
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weighted ? w.contiguous() : w;
  const at::Tensor ct = c.t().contiguous();  // (D, K)
  const at::Tensor ct2 = ct * ct;            // (D, K), for the weighted form
  const at::Tensor c2 = ct2.sum(0);          // (K,), for the plain form
  const int64_t n = x.size(0), d = x.size(1), k = c.size(0);
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({n}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = weighted ? wc.data_ptr<float>() : nullptr;
  const float* cp = ct.data_ptr<float>();
  const float* c2p_all = ct2.data_ptr<float>();
  const float* c2p = c2.data_ptr<float>();
  int64_t* codes_p = codes.data_ptr<int64_t>();
  float* dist_p = dist.data_ptr<float>();

  // distance = sum_j w_j x_j^2 + sum_j (w_j c_kj^2 - 2 w_j x_j c_kj): the first term does not depend
  // on k, so the blocks accumulate only the second (one FMA per coordinate unweighted, two weighted)
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kBlock);
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = xp + i * d;
      const float* wi = weighted ? wp + i * d : nullptr;
      float xx = 0.0f;
      for (int64_t j = 0; j < d; ++j) xx += (weighted ? wi[j] : 1.0f) * xi[j] * xi[j];
      float best = std::numeric_limits<float>::infinity();
      int64_t arg = 0;
      for (int64_t k0 = 0; k0 < k; k0 += kBlock) {
        const int64_t kb = std::min(kBlock, k - k0);
        float* a = acc.data();
        if (weighted) {
          std::fill(a, a + kb, 0.0f);
        } else {
          std::copy(c2p + k0, c2p + k0 + kb, a);
        }
        for (int64_t j = 0; j < d; ++j) {
          const float* cj = cp + j * k + k0;
          if (weighted) {
            const float wv = wi[j], m2wx = -2.0f * wi[j] * xi[j];
            const float* cj2 = c2p_all + j * k + k0;
            for (int64_t q = 0; q < kb; ++q) a[q] += wv * cj2[q] + m2wx * cj[q];
          } else {
            const float m2x = -2.0f * xi[j];
            for (int64_t q = 0; q < kb; ++q) a[q] += m2x * cj[q];
          }
        }
        float block_min = a[0];
        for (int64_t q = 1; q < kb; ++q) block_min = std::min(block_min, a[q]);  // vectorizes
        if (block_min < best) {  // rare after the first blocks: find its first index
          best = block_min;
          for (int64_t q = 0; q < kb; ++q) {
            if (a[q] == block_min) {
              arg = k0 + q;
              break;
            }
          }
        }
      }
      codes_p[i] = arg;
      dist_p[i] = std::max(best + xx, 0.0f);
    }
  });
  return {codes, dist};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kmeans_assign", &kmeans_assign, "nearest centroid and its (weighted) squared distance, fp32 CPU");
}
