/* The AVX2 kernels (x86_avx2.c) built a second time, their integer dot products as AVX-512 VNNI
 * instructions on 256-bit registers (vpdpbusd, vpdpwssd). Same bits as the AVX2 build; installed by
 * the AVX-512 set where the CPU has VNNI. */
#define CE_AVX2_VNNI 1
#include "x86_avx2.c"
