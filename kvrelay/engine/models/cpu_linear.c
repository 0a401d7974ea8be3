/* Few-row float32 linear for CPU decoding: y[m, r] = sum_k x[m, k] * W[r, k] + b[r].
 *
 * With one to a few rows of x the projection is bound by reading W once from memory, and
 * library GEMMs reach about half the machine's read bandwidth on these shapes. Here each
 * thread takes a contiguous range of W's rows and streams it exactly once: a 4-row tile of W
 * is read from memory for the first row of x and from L1 for the others. The inner loop is
 * an OpenMP SIMD reduction the compiler vectorizes for the host (-march=native).
 * Compiled and loaded at run time by cpu_linear.py; see that file for the build.
 */
#include <stdint.h>

#define TILE 4

void kvrelay_linear_f32(const float *restrict w, const float *restrict x,
                        const float *restrict b, float *restrict y,
                        int64_t num_x_rows, int64_t out_features, int64_t in_features) {
#pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < out_features; r0 += TILE) {
        int64_t tile = out_features - r0 < TILE ? out_features - r0 : TILE;
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
