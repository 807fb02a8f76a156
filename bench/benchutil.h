/* benchutil.h — clocks and latency percentiles shared by the bench tools.
 *
 * Header-only on purpose: the bench programs are single files and this is
 * all they share. Must never: be used by the product (it aborts on OOM).
 */
#ifndef SMIME_BENCHUTIL_H
#define SMIME_BENCHUTIL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline double now_s(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Sleeps for s seconds, or less if *stop becomes true (checked every 10 ms). */
static inline void sleep_s(double s, atomic_bool *stop)
{
        double end = now_s() + s;

        while (!atomic_load(stop)) {
                double left = end - now_s();
                struct timespec ts;

                if (left <= 0)
                        break;
                if (left > 0.01)
                        left = 0.01;
                ts.tv_sec = 0;
                ts.tv_nsec = (long)(left * 1e9);
                nanosleep(&ts, NULL);
        }
}

/* Every latency sample, in seconds. */
struct lat {
        double *v;
        size_t n, cap;
};

static inline void lat_add(struct lat *l, double s)
{
        if (l->n == l->cap) {
                size_t cap = l->cap ? 2 * l->cap : 1024;
                double *v = realloc(l->v, cap * sizeof(*v));

                if (!v) {
                        fputs("out of memory\n", stderr);
                        abort();
                }
                l->v = v;
                l->cap = cap;
        }
        l->v[l->n++] = s;
}

static inline void lat_merge(struct lat *dst, const struct lat *src)
{
        for (size_t i = 0; i < src->n; i++)
                lat_add(dst, src->v[i]);
}

static inline int lat_cmp(const void *a, const void *b)
{
        double x = *(const double *)a, y = *(const double *)b;

        return x < y ? -1 : x > y;
}

/* The p-th percentile (nearest rank); 0 without samples. Sorts l. */
static inline double lat_pct(struct lat *l, double p)
{
        size_t k;

        if (l->n == 0)
                return 0;
        qsort(l->v, l->n, sizeof(*l->v), lat_cmp);
        k = (size_t)(p / 100.0 * (double)l->n + 0.999999);
        if (k < 1)
                k = 1;
        if (k > l->n)
                k = l->n;
        return l->v[k - 1];
}

static inline void lat_free(struct lat *l)
{
        free(l->v);
        memset(l, 0, sizeof(*l));
}

#endif
