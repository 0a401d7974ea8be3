/* float32 CPU kernels for decoding, compiled for the host at first use by cpu_kernels.py.
 *
 * Inner loops are OpenMP SIMD reductions the compiler vectorizes for the host
 * (-march=native); work is split over torch's OpenMP threads (same runtime, already loaded).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* y[m, r] = sum_k x[m, k] * w[r, k] + b[r] for a few rows m of x.
 *
 * With one to a few rows of x the projection is bound by reading w once from memory; library
 * GEMMs reach about 60-75 % of the read bandwidth on these shapes. Here each thread takes a
 * contiguous range of w's rows and streams it once: a tile of 4 rows of w comes from memory
 * for the first row of x and from L1 for the others. */
void kvrelay_linear_f32(const float *restrict w, const float *restrict x,
                        const float *restrict b, float *restrict y,
                        int64_t num_x_rows, int64_t out_features, int64_t in_features) {
#pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < out_features; r0 += 4) {
        int64_t tile = out_features - r0 < 4 ? out_features - r0 : 4;
        for (int64_t m = 0; m < num_x_rows; m++) {
            const float *xm = x + m * in_features;
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
                                 float scale) {
    const int64_t group = num_heads / num_kv_heads;
    int failed = 0;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) reduction(| : failed)
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
