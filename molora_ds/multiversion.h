// One build of our CPU kernels serves every x86-64 machine: each loop marked MULTIVERSION is compiled for
// AVX-512, AVX2 + FMA and the baseline, and the loader picks the variant the CPU running it supports.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif
