// The Python module vmq._C. Importing it registers every compiled kernel with the vmq operator
// library (TORCH_LIBRARY_IMPL blocks in csrc/cpu and csrc/cuda); the schemas are declared in
// vmq/ops/_library.py, which imports this module after declaring them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef VMQ_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  m.attr("cpu_isa") = "avx512-vnni";  // the int8 linear's vpdpbusd path
#elif defined(__AVX2__)
  m.attr("cpu_isa") = "avx2";
#else
  m.attr("cpu_isa") = "generic";
#endif
}
