// The few C++ standard library names the kernels use (<cstdint>'s integers, <cfloat>'s FLT_MAX),
// under nvcc from the standard headers and under NVRTC, which has none, as plain definitions.
// NVRTC (vmq/ops/nvrtc, the CUDA kernels without a toolkit) compiles the .cu files' kernels only:
// their host launch functions sit inside `#if !defined(__CUDACC_RTC__)` (a new .cu file must do
// the same), and launchers.h's declarations parse as unused device ones (-default-device).
#pragma once
#if defined(__CUDACC_RTC__)
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#define FLT_MAX 3.40282347e+38F
#else
#include <cfloat>
#include <cstdint>
#endif
