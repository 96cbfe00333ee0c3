/* Three parts of DAT's deformable attention on the CPU (see cpu_kernels.py): the relative position
   bias of deformed keys and the sampling of keys and values, forward and backward, both read
   bilinearly as grid_sample(align_corners=True, padding_mode="zeros") does; and the weight gradient
   of the offset network's depthwise convolution. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PAD 2 /* zero border of the table copy: a corner outside the table reads 0 and takes no gradient */
typedef float v4 __attribute__((vector_size(16))); /* 4 heads of one table pixel */

/* Lower pixel (clamped so both corners stay in the padded copy) and fraction of the table coordinate
   of half the displacement q - p along one axis, for every (query coordinate a, sample k). */
static void axis(const float *q, long nq, const float *p, long Ns, long size, int *i0, float *f) {
    const float s = 0.5f * (size - 1);
    for (long a = 0; a < nq; a++)
        for (long k = 0; k < Ns; k++) {
            const float t = (0.5f * q[a] + -0.5f * p[2 * k] + 1.f) * s;
            const float fl = floorf(t);
            i0[a * Ns + k] = (int)fminf(fmaxf(fl, -PAD), (float)size); /* (NaN: -PAD) */
            f[a * Ns + k] = t - fl;
        }
}

typedef struct {
    long G, mg, H, W, Ns, Ht, Wt, hv, Wp, plane; /* hv: vectors of 4 heads; plane: padded pixels */
    v4 *T;
    int *y0, *x0;
    float *fy, *fx, *zero;
} Work;

static void work_free(Work *w) { free(w->T); free(w->y0); free(w->x0); free(w->fy); free(w->fx); free(w->zero); }

static int work_alloc(Work *w, long G, long mg, long H, long W, long Ns, long Ht, long Wt) {
    *w = (Work){G, mg, H, W, Ns, Ht, Wt, (mg + 3) / 4, Wt + 2 * PAD + 1, 0};
    w->plane = (Ht + 2 * PAD + 1) * w->Wp;
    w->T = aligned_alloc(16, w->hv * w->plane * sizeof(v4));
    w->y0 = malloc(H * Ns * sizeof(int));
    w->x0 = malloc(W * Ns * sizeof(int));
    w->fy = malloc(H * Ns * sizeof(float));
    w->fx = malloc(W * Ns * sizeof(float));
    w->zero = calloc(Ns, sizeof(float));
    if (w->T && w->y0 && w->x0 && w->fy && w->fx && w->zero) return 1;
    work_free(w);
    return 0;
}

/* Image-group n: its group's tables into the padded, head-interleaved copy; its axis coordinates. */
static void work_load(Work *w, const float *table, const float *qy, const float *qx, const float *pos, long n) {
    const long g = n % w->G;
    memset(w->T, 0, w->hv * w->plane * sizeof(v4));
    for (long j = 0; j < w->mg; j++)
        for (long y = 0; y < w->Ht; y++)
            for (long x = 0; x < w->Wt; x++)
                w->T[(j / 4) * w->plane + (y + PAD) * w->Wp + x + PAD][j % 4] = table[((g * w->mg + j) * w->Ht + y) * w->Wt + x];
    const float *p = pos + n * w->Ns * 2;
    axis(qy, w->H, p, w->Ns, w->Ht, w->y0, w->fy);
    axis(qx, w->W, p + 1, w->Ns, w->Wt, w->x0, w->fx);
}

/* Rows of heads 4h..4h+3 of query q in a (N, mg, HW, Ns) tensor; `spare` for heads past mg. */
static void head_rows(const Work *w, float *base, long n, long h, long q, float *spare, float **rows) {
    for (long j = 0; j < 4; j++) {
        const long head = 4 * h + j;
        rows[j] = head < w->mg ? base + ((n * w->mg + head) * w->H * w->W + q) * w->Ns : spare;
    }
}

/* out (N, mg, H*W, Ns) for image-groups n0 <= n < n1. Returns 0, or 1 when out of memory. */
static int forward_span(const float *table, const float *qy, const float *qx, const float *pos, float *out,
                        long n0, long n1, long G, long mg, long H, long W, long Ns, long Ht, long Wt) {
    Work w;
    float *spare = malloc(Ns * sizeof(float));
    if (!spare || !work_alloc(&w, G, mg, H, W, Ns, Ht, Wt)) { free(spare); return 1; }
    const long Wp = w.Wp;
    for (long n = n0; n < n1; n++) {
        work_load(&w, table, qy, qx, pos, n);
        for (long h = 0; h < w.hv; h++) {
            const v4 *t = w.T + h * w.plane;
            for (long i = 0; i < H; i++)
                for (long l = 0; l < W; l++) {
                    const int *Y = w.y0 + i * Ns, *X = w.x0 + l * Ns;
                    const float *FY = w.fy + i * Ns, *FX = w.fx + l * Ns;
                    float *o[4];
                    head_rows(&w, out, n, h, i * W + l, spare, o);
                    for (long k = 0; k < Ns; k++) {
                        const v4 *c = t + (Y[k] + PAD) * Wp + X[k] + PAD;
                        const v4 top = c[0] + FX[k] * (c[1] - c[0]);
                        const v4 bottom = c[Wp] + FX[k] * (c[Wp + 1] - c[Wp]);
                        const v4 v = top + FY[k] * (bottom - top);
                        o[0][k] = v[0]; o[1][k] = v[1]; o[2][k] = v[2]; o[3][k] = v[3];
                    }
                }
        }
    }
    work_free(&w);
    free(spare);
    return 0;
}

/* From grad (N, mg, H*W, Ns): adds the table gradient of image-groups n0 <= n < n1 to gtable (M, Ht,
   Wt) and writes their rows of gpos (N, Ns, 2). Returns 0, or 1 when out of memory. */
static int backward_span(const float *table, const float *qy, const float *qx, const float *pos, const float *grad,
                         float *gtable, float *gpos, long n0, long n1, long G, long mg, long H, long W, long Ns,
                         long Ht, long Wt) {
    Work w;
    if (!work_alloc(&w, G, mg, H, W, Ns, Ht, Wt)) return 1;
    const long Wp = w.Wp;
    v4 *gT = aligned_alloc(16, w.hv * w.plane * sizeof(v4)), *gy = aligned_alloc(16, Ns * sizeof(v4)),
       *gx = aligned_alloc(16, Ns * sizeof(v4));
    if (!gT || !gy || !gx) { work_free(&w); free(gT); free(gy); free(gx); return 1; }
    for (long n = n0; n < n1; n++) {
        work_load(&w, table, qy, qx, pos, n);
        memset(gT, 0, w.hv * w.plane * sizeof(v4));
        memset(gy, 0, Ns * sizeof(v4));
        memset(gx, 0, Ns * sizeof(v4));
        for (long h = 0; h < w.hv; h++) {
            const v4 *t = w.T + h * w.plane;
            v4 *gt = gT + h * w.plane;
            for (long i = 0; i < H; i++)
                for (long l = 0; l < W; l++) {
                    const int *Y = w.y0 + i * Ns, *X = w.x0 + l * Ns;
                    const float *FY = w.fy + i * Ns, *FX = w.fx + l * Ns;
                    float *r[4];
                    head_rows(&w, (float *)grad, n, h, i * W + l, w.zero, r);
                    for (long k = 0; k < Ns; k++) {
                        const long o = (Y[k] + PAD) * Wp + X[k] + PAD;
                        const v4 g = {r[0][k], r[1][k], r[2][k], r[3][k]};
                        const v4 *c = t + o;
                        const v4 dy0 = c[Wp] - c[0], dy1 = c[Wp + 1] - c[1];
                        const v4 dx0 = c[1] - c[0], dx1 = c[Wp + 1] - c[Wp];
                        gy[k] += g * (dy0 + FX[k] * (dy1 - dy0));
                        gx[k] += g * (dx0 + FY[k] * (dx1 - dx0));
                        const v4 b = g * FY[k], a = g - b; /* g fy, g (1 - fy) */
                        const v4 bx = b * FX[k], ax = a * FX[k];
                        v4 *d = gt + o;
                        d[0] += a - ax; d[1] += ax; d[Wp] += b - bx; d[Wp + 1] += bx;
                    }
                }
        }
        const float sy = -0.25f * (Ht - 1), sx = -0.25f * (Wt - 1); /* d(table coordinate) / d(position) */
        for (long k = 0; k < Ns; k++) {
            gpos[(n * Ns + k) * 2] = (gy[k][0] + gy[k][1] + gy[k][2] + gy[k][3]) * sy;
            gpos[(n * Ns + k) * 2 + 1] = (gx[k][0] + gx[k][1] + gx[k][2] + gx[k][3]) * sx;
        }
        const long g = n % G;
        for (long j = 0; j < mg; j++)
            for (long y = 0; y < Ht; y++)
                for (long x = 0; x < Wt; x++)
                    gtable[((g * mg + j) * Ht + y) * Wt + x] += gT[(j / 4) * w.plane + (y + PAD) * Wp + x + PAD][j % 4];
    }
    work_free(&w); free(gT); free(gy); free(gx);
    return 0;
}

/* The entry points: the N image-groups cut into T spans, one per thread. (Every entry point runs on T
   threads, torch's thread count: compiled with -fopenmp but linked without an OpenMP runtime, the
   library uses the one torch has loaded; compiled without, it runs its loops on one thread.) Return
   0, or 1 when out of memory. */
int dat_bias_forward(const float *table, const float *qy, const float *qx, const float *pos, float *out, long N,
                     long T, long G, long mg, long H, long W, long Ns, long Ht, long Wt) {
    int failed = 0;
#pragma omp parallel for num_threads(T) schedule(static) reduction(| : failed)
    for (long t = 0; t < T; t++)
        failed |= forward_span(table, qy, qx, pos, out, N * t / T, N * (t + 1) / T, G, mg, H, W, Ns, Ht, Wt);
    return failed;
}

/* gtable_parts (T, M, Ht, Wt), zeroed: span t adds its table gradient to part t (summed by the caller,
   in order: deterministic for a given T); gpos (N, Ns, 2) written. */
int dat_bias_backward(const float *table, const float *qy, const float *qx, const float *pos, const float *grad,
                      float *gtable_parts, float *gpos, long N, long T, long G, long mg, long H, long W, long Ns,
                      long Ht, long Wt) {
    int failed = 0;
#pragma omp parallel for num_threads(T) schedule(static) reduction(| : failed)
    for (long t = 0; t < T; t++)
        failed |= backward_span(table, qy, qx, pos, grad, gtable_parts + t * G * mg * Ht * Wt, gpos, N * t / T,
                                N * (t + 1) / T, G, mg, H, W, Ns, Ht, Wt);
    return failed;
}

/* ---- Keys and values of deformable attention: x sampled bilinearly at the sampling positions ---- */

typedef float v4u __attribute__((vector_size(16), aligned(4))); /* 4 channels, any float alignment */

/* A point's four neighbours in an (H, W) map, (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1): whether
   inside, element offsets (pixel times C), bilinear weights, and the weights' slopes in y and x (for
   the position gradient); a neighbour outside the map has offset, weight and slopes 0. */
typedef struct { long at[4]; int in[4]; float w[4], dy[4], dx[4]; } Corners;

static Corners corners(float py, float px, long H, long W, long C) {
    const float ty = (py + 1.f) * (0.5f * (H - 1)), tx = (px + 1.f) * (0.5f * (W - 1));
    const float fly = floorf(ty), flx = floorf(tx), fy = ty - fly, fx = tx - flx;
    const long y0 = (long)fmaxf(fminf(fly, (float)H), -2.f), x0 = (long)fmaxf(fminf(flx, (float)W), -2.f);
    Corners c;
    for (int j = 0; j < 4; j++) {
        const long y = y0 + j / 2, x = x0 + j % 2;
        const int in = y >= 0 && y < H && x >= 0 && x < W;
        const float wy = j / 2 ? fy : 1 - fy, wx = j % 2 ? fx : 1 - fx;
        c.in[j] = in;
        c.at[j] = in ? (y * W + x) * C : 0;
        c.w[j] = in ? wy * wx : 0;
        c.dy[j] = in ? (j / 2 ? 1 : -1) * wx : 0;
        c.dx[j] = in ? (j % 2 ? 1 : -1) * wy : 0;
    }
    return c;
}

/* x (B, H, W, C) channels-last, pos (B*G, Ns, 2) as (y, x) in [-1, 1] -> out (B, Ns, C): group g's
   Cg = C/G channels sampled at group g's positions. */
int dat_keys_forward(const float *x, const float *pos, float *out, long B, long G, long H, long W, long C, long Ns,
                     long T) {
    const long Cg = C / G;
    float *zero = calloc(Cg, sizeof(float)); /* what a neighbour outside the map reads */
    if (!zero) return 1;
#pragma omp parallel for num_threads(T) schedule(static)
    for (long n = 0; n < B * G; n++) {
        const long b = n / G, g = n % G;
        const float *xb = x + b * H * W * C + g * Cg;
        for (long k = 0; k < Ns; k++) {
            const Corners c = corners(pos[(n * Ns + k) * 2], pos[(n * Ns + k) * 2 + 1], H, W, C);
            const float *v[4];
            for (int j = 0; j < 4; j++) v[j] = c.in[j] ? xb + c.at[j] : zero;
            float *o = out + (b * Ns + k) * C + g * Cg;
            for (long ch = 0; ch < Cg; ch++)
                o[ch] = c.w[0] * v[0][ch] + c.w[1] * v[1][ch] + c.w[2] * v[2][ch] + c.w[3] * v[3][ch];
        }
    }
    free(zero);
    return 0;
}

/* grad (B, Ns, C) -> gx (B, H, W, C) (zeroed by the caller; each (image, group) its own channels, so
   no two threads write one element) and gpos (B*G, Ns, 2). */
int dat_keys_backward(const float *x, const float *pos, const float *grad, float *gx, float *gpos, long B, long G,
                      long H, long W, long C, long Ns, long T) {
    const long Cg = C / G, vectors = Cg / 4;
#pragma omp parallel for num_threads(T) schedule(static)
    for (long n = 0; n < B * G; n++) {
        const long b = n / G, g = n % G;
        const float *xb = x + b * H * W * C + g * Cg;
        float *gb = gx + b * H * W * C + g * Cg;
        for (long k = 0; k < Ns; k++) {
            const Corners c = corners(pos[(n * Ns + k) * 2], pos[(n * Ns + k) * 2 + 1], H, W, C);
            const float *go = grad + (b * Ns + k) * C + g * Cg;
            v4u sy = {0, 0, 0, 0}, sx = {0, 0, 0, 0};
            for (int j = 0; j < 4; j++) {
                if (!c.in[j]) continue;
                const float *v = xb + c.at[j];
                float *d = gb + c.at[j];
                long ch = 0;
                for (; ch < vectors * 4; ch += 4) {
                    const v4u gg = *(const v4u *)(go + ch), vv = *(const v4u *)(v + ch);
                    *(v4u *)(d + ch) += c.w[j] * gg;
                    sy += c.dy[j] * gg * vv;
                    sx += c.dx[j] * gg * vv;
                }
                float ry = 0, rx = 0;
                for (; ch < Cg; ch++) {
                    d[ch] += c.w[j] * go[ch];
                    ry += c.dy[j] * go[ch] * v[ch];
                    rx += c.dx[j] * go[ch] * v[ch];
                }
                sy[0] += ry;
                sx[0] += rx;
            }
            gpos[(n * Ns + k) * 2] = (sy[0] + sy[1] + sy[2] + sy[3]) * (0.5f * (H - 1));
            gpos[(n * Ns + k) * 2 + 1] = (sx[0] + sx[1] + sx[2] + sx[3]) * (0.5f * (W - 1));
        }
    }
    return 0;
}

/* ---- The offset network's depthwise convolution: its weight gradient ---- */

/* x (B, H, W, C) and grad (B, Ho, Wo, C), channels-last -> gw (C, k, k): gw[c, i, j] = sum over b, yo, xo
   of x[b, yo*s + i - pad, xo*s + j - pad, c] grad[b, yo, xo, c] (x zero outside). Threads own slices
   of channels. */
int dat_dwconv_weight_grad(const float *x, const float *grad, float *gw, long B, long H, long W, long C, long Ho,
                           long Wo, long k, long s, long pad, long T) {
    const long slice = 64; /* channels a thread accumulates at once: k*k*slice floats stay in cache */
    int failed = 0;
#pragma omp parallel for num_threads(T) schedule(static) reduction(| : failed)
    for (long c0 = 0; c0 < C; c0 += slice) {
        const long cs = C - c0 < slice ? C - c0 : slice;
        float *acc = calloc(k * k * cs, sizeof(float));
        if (!acc) { failed = 1; continue; }
        for (long b = 0; b < B; b++)
            for (long yo = 0; yo < Ho; yo++)
                for (long xo = 0; xo < Wo; xo++) {
                    const float *restrict g = grad + ((b * Ho + yo) * Wo + xo) * C + c0;
                    for (long i = 0; i < k; i++) {
                        const long y = yo * s + i - pad;
                        if (y < 0 || y >= H) continue;
                        for (long j = 0; j < k; j++) {
                            const long xx = xo * s + j - pad;
                            if (xx < 0 || xx >= W) continue;
                            const float *restrict v = x + ((b * H + y) * W + xx) * C + c0;
                            float *restrict a = acc + (i * k + j) * cs;
                            for (long c = 0; c < cs; c++) a[c] += v[c] * g[c];
                        }
                    }
                }
        for (long c = 0; c < cs; c++)
            for (long t = 0; t < k * k; t++) gw[(c0 + c) * k * k + t] = acc[t * cs + c];
        free(acc);
    }
    return failed;
}
