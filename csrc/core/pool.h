/* The core's thread pool (private). */
#ifndef CECOLLM_POOL_H
#define CECOLLM_POOL_H

#include <stdint.h>

#include "cecollm/cecollm.h"

/* Runs fn(ctx, begin, end, thread) over disjoint chunks covering [0, n), one chunk per thread;
 * thread is in [0, ce_threads_get()) and indexes per-thread scratch. */
typedef void (*ce_task_fn)(void *ctx, int64_t begin, int64_t end, int thread);
void ce_parallel_for(int64_t n, ce_task_fn fn, void *ctx);

#endif
