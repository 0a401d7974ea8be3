/* float32 CPU kernels for decoding, compiled for the host at first use by cpu_kernels.py.
 *
 * Inner loops are OpenMP SIMD reductions the compiler vectorizes for the host
 * (-march=native); work is split over `threads` OpenMP threads (torch's runtime, already
 * loaded; the caller passes torch's thread count, which a new thread would not inherit).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* y[m, r] = sum_k x[m, k] * w[r, k] + b[r] for a few rows m of x (row stride x_stride).
 *
 * With one to a few rows of x the projection is bound by reading w once from memory; library
 * GEMMs reach about 60-75 % of the read bandwidth on these shapes. Here each thread takes a
 * contiguous range of w's rows and streams it once: a tile of 4 rows of w comes from memory
 * for the first row of x and from L1 for the others. */
static void linear(const float *restrict w, const float *restrict x, int64_t x_stride,
                   const float *restrict b, float *restrict y, int64_t num_x_rows,
                   int64_t out_features, int64_t in_features, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r0 = 0; r0 < out_features; r0 += 4) {
        int64_t tile = out_features - r0 < 4 ? out_features - r0 : 4;
        for (int64_t m = 0; m < num_x_rows; m++) {
            const float *xm = x + m * x_stride;
            for (int64_t i = 0; i < tile; i++) {
                const float *wr = w + (r0 + i) * in_features;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t k = 0; k < in_features; k++) acc += wr[k] * xm[k];
                y[m * out_features + r0 + i] = b ? acc + b[r0 + i] : acc;
            }
        }
    }
}

void kvrelay_linear_f32(const float *w, const float *x, const float *b, float *y,
                        int64_t num_x_rows, int64_t out_features, int64_t in_features,
                        int threads) {
    linear(w, x, in_features, b, y, num_x_rows, out_features, in_features, threads);
}

/* out = w * (x / sqrt(mean(x^2) + eps)), row by row, in the order torch computes it. */
static void rms_norm(const float *restrict x, const float *restrict w, float *restrict out,
                     int64_t rows, int64_t hidden, float eps) {
    for (int64_t m = 0; m < rows; m++) {
        const float *xm = x + m * hidden;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t k = 0; k < hidden; k++) squares += xm[k] * xm[k];
        const float inv = 1.0f / sqrtf(squares / (float)hidden + eps);
        for (int64_t k = 0; k < hidden; k++) out[m * hidden + k] = w[k] * (xm[k] * inv);
    }
}

/* A decoder layer up to attention, for a few tokens: h = rms_norm(x); qkv = h Wqkv^T + b;
 * RoPE on the q and k heads with cos / sign-folded sin tables (rows, head_dim):
 * out[d] = x[d] cos[d] + x[(d + head_dim / 2) % head_dim] sin[d].
 * h: scratch (rows, hidden); qkv: (rows, (num_heads + 2 num_kv_heads) head_dim). */
void kvrelay_pre_attention_f32(const float *x, const float *norm_w, const float *qkv_w,
                               const float *qkv_b, const float *cos, const float *sin,
                               float *h, float *qkv, int64_t rows, int64_t hidden,
                               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               float eps, int threads) {
    const int64_t width = (num_heads + 2 * num_kv_heads) * head_dim, half = head_dim / 2;
    rms_norm(x, norm_w, h, rows, hidden, eps);
    linear(qkv_w, h, hidden, qkv_b, qkv, rows, width, hidden, threads);
    float rotated[head_dim];
    for (int64_t m = 0; m < rows; m++) {
        const float *c = cos + m * head_dim, *s = sin + m * head_dim;
        for (int64_t head = 0; head < num_heads + num_kv_heads; head++) {
            float *p = qkv + m * width + head * head_dim;
            for (int64_t d = 0; d < head_dim; d++)
                rotated[d] = p[d] * c[d] + p[(d + half) % head_dim] * s[d];
            for (int64_t d = 0; d < head_dim; d++) p[d] = rotated[d];
        }
    }
}

/* The rest of the layer, updating the residual stream x (rows, hidden) in place:
 * x += attn Wo^T + bo; h = rms_norm(x); [g u] = h Wgu^T; x += (silu(g) * u) Wdown^T.
 * h: scratch (rows, hidden); gate_up: scratch (rows, 2 intermediate). */
void kvrelay_post_attention_f32(float *x, const float *attn, const float *o_w,
                                const float *o_b, const float *norm_w, const float *gate_up_w,
                                const float *down_w, float *h, float *gate_up, int64_t rows,
                                int64_t hidden, int64_t q_dim, int64_t intermediate, float eps,
                                int threads) {
    linear(o_w, attn, q_dim, o_b, h, rows, hidden, q_dim, threads);
    for (int64_t i = 0; i < rows * hidden; i++) x[i] += h[i];
    rms_norm(x, norm_w, h, rows, hidden, eps);
    linear(gate_up_w, h, hidden, NULL, gate_up, rows, 2 * intermediate, hidden, threads);
    for (int64_t m = 0; m < rows; m++) {
        float *g = gate_up + m * 2 * intermediate, *u = g + intermediate;
        for (int64_t j = 0; j < intermediate; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
    linear(down_w, gate_up, 2 * intermediate, NULL, h, rows, hidden, intermediate, threads);
    for (int64_t i = 0; i < rows * hidden; i++) x[i] += h[i];
}

/* Decode attention read in place from the paged cache: no gathered copy of the context.
 *
 * q, out: (num_seqs, num_heads, head_dim); caches: (num_blocks, num_kv_heads, block_size,
 * head_dim); block_tables: (num_seqs, max_blocks); ctx_lens: (num_seqs,), context length of
 * each sequence including its new token. k_new, v_new: (num_seqs, num_kv_heads, head_dim),
 * the new token's K/V, stored at position ctx_len - 1 first; NULL when already stored. One
 * task per (sequence, KV head) attends all the query heads that share that KV head, reading
 * each cached K and V row once. Returns 0, or -1 when a score buffer cannot be allocated. */
int kvrelay_decode_attention_f32(const float *restrict q, const float *restrict k_new,
                                 const float *restrict v_new, float *restrict k_cache,
                                 float *restrict v_cache,
                                 const int64_t *restrict block_tables,
                                 const int64_t *restrict ctx_lens, float *restrict out,
                                 int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                 float scale, int threads) {
    const int64_t group = num_heads / num_kv_heads;
    int failed = 0;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) reduction(| : failed) \
    num_threads(threads)
    for (int64_t s = 0; s < num_seqs; s++) {
        for (int64_t kvh = 0; kvh < num_kv_heads; kvh++) {
            const int64_t ctx = ctx_lens[s];
            float *scores = malloc(sizeof(float) * group * ctx);
            if (!scores) {
                failed = 1;
                continue;
            }
            const int64_t *table = block_tables + s * max_blocks;
            if (k_new) {
                const int64_t last = ctx - 1, src = (s * num_kv_heads + kvh) * head_dim;
                const int64_t dst = ((table[last / block_size] * num_kv_heads + kvh) * block_size +
                                     last % block_size) * head_dim;
                for (int64_t d = 0; d < head_dim; d++) {
                    k_cache[dst + d] = k_new[src + d];
                    v_cache[dst + d] = v_new[src + d];
                }
            }
            const float *qh = q + (s * num_heads + kvh * group) * head_dim;
            float *oh = out + (s * num_heads + kvh * group) * head_dim;
            for (int64_t t = 0; t < ctx; t++) {
                const int64_t row = (table[t / block_size] * num_kv_heads + kvh) * block_size +
                                    t % block_size;
                const float *kr = k_cache + row * head_dim;
                for (int64_t g = 0; g < group; g++) {
                    const float *qg = qh + g * head_dim;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * kr[d];
                    scores[g * ctx + t] = dot * scale;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *sg = scores + g * ctx, top = -INFINITY, total = 0.0f;
                for (int64_t t = 0; t < ctx; t++) top = sg[t] > top ? sg[t] : top;
                for (int64_t t = 0; t < ctx; t++) {
                    sg[t] = expf(sg[t] - top);
                    total += sg[t];
                }
                for (int64_t t = 0; t < ctx; t++) sg[t] /= total;
                for (int64_t d = 0; d < head_dim; d++) oh[g * head_dim + d] = 0.0f;
            }
            for (int64_t t = 0; t < ctx; t++) {
                const int64_t row = (table[t / block_size] * num_kv_heads + kvh) * block_size +
                                    t % block_size;
                const float *vr = v_cache + row * head_dim;
                for (int64_t g = 0; g < group; g++) {
                    const float p = scores[g * ctx + t];
                    float *og = oh + g * head_dim;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; d++) og[d] += p * vr[d];
                }
            }
            free(scores);
        }
    }
    return failed ? -1 : 0;
}
