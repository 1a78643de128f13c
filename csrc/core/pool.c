/* A small thread pool for row-split work (matrix–vector products, attention heads).
 *
 * Workers spin briefly after each job (decode issues ~200 short jobs per token, too short for a
 * sleep/wake round trip), then sleep on a condition variable. One job runs at a time: a caller that
 * finds the pool busy (another Python thread with the GIL released) runs its job alone instead of
 * waiting, so threads never oversubscribe the cores. */
#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "util.h"

#define SPIN_ROUNDS (1 << 15)
#define MAX_THREADS 256

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax(void) { _mm_pause(); }
#else
static inline void cpu_relax(void) {}
#endif

static struct {
    pthread_mutex_t use; /* held by the caller whose job is running */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int n_threads; /* workers + the calling thread */
    pthread_t workers[MAX_THREADS];
    atomic_uint generation; /* bumped once per job */
    unsigned start_generation; /* generation when the workers were started */
    atomic_int pending;     /* workers still running the current job */
    atomic_int stop;
    ce_task_fn fn;
    void *ctx;
    int64_t n;
} pool = {.use = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .n_threads = 1};

static void run_chunk(int index) {
    int64_t begin = pool.n * index / pool.n_threads, end = pool.n * (index + 1) / pool.n_threads;
    if (begin < end) pool.fn(pool.ctx, begin, end, index);
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    unsigned seen = pool.start_generation; /* not the current one: a job may already be posted */
    for (;;) {
        unsigned g = seen;
        for (int spin = 0; spin < SPIN_ROUNDS && (g = atomic_load(&pool.generation)) == seen; spin++) cpu_relax();
        if (g == seen) {
            pthread_mutex_lock(&pool.lock);
            while ((g = atomic_load(&pool.generation)) == seen && !atomic_load(&pool.stop))
                pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        if (atomic_load(&pool.stop)) return NULL;
        seen = g;
        run_chunk(index);
        atomic_fetch_sub(&pool.pending, 1);
    }
}

static void stop_workers(void) {
    pthread_mutex_lock(&pool.lock);
    atomic_store(&pool.stop, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    for (int i = 1; i < pool.n_threads; i++) pthread_join(pool.workers[i], NULL);
    atomic_store(&pool.stop, 0);
    pool.n_threads = 1;
}

int ce_threads_available(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set) > 0 ? CPU_COUNT(&set) : 1;
    return 1;
}

ce_status ce_threads_set(int n, char *err, size_t errlen) {
    if (n <= 0) n = ce_threads_available();
    if (n > MAX_THREADS) return ce_fail(err, errlen, CE_EINVAL, "%d threads is more than %d", n, MAX_THREADS);
    pthread_mutex_lock(&pool.use);
    stop_workers();
    pool.start_generation = atomic_load(&pool.generation);
    for (int i = 1; i < n; i++) {
        if (pthread_create(&pool.workers[i], NULL, worker_main, (void *)(intptr_t)i) != 0) {
            pool.n_threads = i; /* join the ones that started */
            stop_workers();
            pthread_mutex_unlock(&pool.use);
            return ce_fail(err, errlen, CE_ENOMEM, "could not start thread %d of %d", i, n);
        }
        pool.n_threads = i + 1;
    }
    pthread_mutex_unlock(&pool.use);
    return CE_OK;
}

int ce_threads_get(void) { return pool.n_threads; }

void ce_parallel_for(int64_t n, ce_task_fn fn, void *ctx) {
    if (n <= 0) return;
    if (pool.n_threads == 1 || n == 1 || pthread_mutex_trylock(&pool.use) != 0) {
        fn(ctx, 0, n, 0);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    atomic_store(&pool.pending, pool.n_threads - 1);
    pthread_mutex_lock(&pool.lock); /* under the lock: a worker about to sleep cannot miss the bump */
    atomic_fetch_add(&pool.generation, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    run_chunk(0);
    while (atomic_load(&pool.pending) > 0) cpu_relax();
    pthread_mutex_unlock(&pool.use);
}
