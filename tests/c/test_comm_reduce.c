/* C tests of the collectives' element reductions against a scalar reference: every dtype
 * and op, 1 to 5 sources, NaN, integer wrap-around, single rounding of f16/bf16, aliasing. */
#include "comm/comm.h"
#include "test_comm_util.h"

static const int dtypes[] = {MS_F32, MS_F64, MS_BF16, MS_F16, MS_I32, MS_I64, MS_U8};

/* Element i of source k: mixed signs, exact in every dtype (u8 stays non-negative). */
static double source_value(int dtype, int k, int64_t i)
{
    double v = (double)((k * 7 + i * 3) % 23) - (dtype == MS_U8 ? 0 : 11);
    return dtype == MS_U8 ? v : v / (dtype == MS_I32 || dtype == MS_I64 ? 1 : 4);
}

static double reference(int dtype, int op, int nsrc, int64_t i)
{
    double acc = source_value(dtype, 0, i);
    for (int k = 1; k < nsrc; k++) {
        double v = source_value(dtype, k, i);
        acc = op == MS_DIST_MAX ? (v > acc ? v : acc) : op == MS_DIST_MIN ? (v < acc ? v : acc)
                                                                         : acc + v;
    }
    if (op != MS_DIST_AVG)
        return acc;
    if (dtype == MS_F64)
        return acc / nsrc;
    if (dtype == MS_F32 || dtype == MS_BF16 || dtype == MS_F16)
        return (float)acc / (float)nsrc;
    return (double)((int64_t)acc / nsrc);
}

typedef struct reference_case {
    int dtype, op, nsrc;
} reference_case;

static double reference_at(int64_t i, void *context)
{
    reference_case *c = context;
    return reference(c->dtype, c->op, c->nsrc, i);
}

static void test_against_reference(void)
{
    enum { COUNT = 1300 }; /* crosses the 512-element blocks */
    for (size_t d = 0; d < sizeof dtypes / sizeof *dtypes; d++)
        for (int op = MS_DIST_SUM; op <= MS_DIST_MIN; op++)
            for (int nsrc = 1; nsrc <= 5; nsrc++) {
                int dtype = dtypes[d];
                size_t esize = ms_dtype_size(dtype);
                unsigned char *buffers[5], *out = malloc(COUNT * esize);
                const void *srcs[5];
                for (int k = 0; k < nsrc; k++) {
                    buffers[k] = malloc(COUNT * esize);
                    for (int64_t i = 0; i < COUNT; i++)
                        store_element(buffers[k], dtype, i, source_value(dtype, k, i));
                    srcs[k] = buffers[k];
                }
                ms_comm_reduce(out, srcs, nsrc, COUNT, dtype, op);
                reference_case c = {dtype, op, nsrc};
                EXPECT(count_wrong(out, dtype, COUNT, 0, reference_at, &c) == 0);
                /* the destination may be one of the sources */
                ms_comm_reduce(buffers[nsrc - 1], srcs, nsrc, COUNT, dtype, op);
                EXPECT(memcmp(buffers[nsrc - 1], out, COUNT * esize) == 0);
                for (int k = 0; k < nsrc; k++)
                    free(buffers[k]);
                free(out);
            }
}

static void test_nan_propagates(void)
{
    float a[2] = {NAN, 1.0f}, b[2] = {2.0f, NAN}, out[2];
    const void *srcs[2] = {a, b};
    for (int op = MS_DIST_MAX; op <= MS_DIST_MIN; op++) {
        ms_comm_reduce(out, srcs, 2, 2, MS_F32, op);
        EXPECT(isnan(out[0]) && isnan(out[1]));
    }
    uint16_t ha[1] = {bf16_bits(NAN)}, hb[1] = {bf16_bits(3.0f)}, hout[1];
    const void *hsrcs[2] = {hb, ha};
    ms_comm_reduce(hout, hsrcs, 2, 1, MS_BF16, MS_DIST_MAX);
    EXPECT(isnan(bf16_value(hout[0])));
}

static void test_integers_wrap(void)
{
    int32_t a32[1] = {INT32_MAX}, b32[1] = {1}, out32[1];
    ms_comm_reduce(out32, (const void *[]){a32, b32}, 2, 1, MS_I32, MS_DIST_SUM);
    EXPECT(out32[0] == INT32_MIN);
    uint8_t a8[1] = {200}, b8[1] = {100}, out8[1];
    ms_comm_reduce(out8, (const void *[]){a8, b8}, 2, 1, MS_U8, MS_DIST_SUM);
    EXPECT(out8[0] == 44);
    int64_t a64[1] = {-7}, b64[1] = {0}, out64[1];
    ms_comm_reduce(out64, (const void *[]){a64, b64}, 2, 1, MS_I64, MS_DIST_AVG);
    EXPECT(out64[0] == -3);
}

/* 1 + 2^-8 + 2^-8 is exact in bf16 only when the sum is rounded once, at the end. */
static void test_half_rounds_once(void)
{
    uint16_t one[1] = {bf16_bits(1.0f)}, tiny[1] = {bf16_bits(0.00390625f)}, out[1];
    ms_comm_reduce(out, (const void *[]){one, tiny, tiny}, 3, 1, MS_BF16, MS_DIST_SUM);
    EXPECT(bf16_value(out[0]) == 1.0078125f);
    uint16_t h_one[1] = {f16_bits(1.0f)}, h_tiny[1] = {f16_bits(0.00048828125f)}, h_out[1];
    ms_comm_reduce(h_out, (const void *[]){h_one, h_tiny, h_tiny}, 3, 1, MS_F16, MS_DIST_SUM);
    EXPECT(f16_value(h_out[0]) == 1.0009765625f);
}

static void test_divide(void)
{
    float f[3] = {3.0f, -1.0f, 7.0f};
    ms_comm_divide(f, 3, MS_F32, 2);
    EXPECT(f[0] == 1.5f && f[1] == -0.5f && f[2] == 3.5f);
    int32_t i[2] = {7, -7};
    ms_comm_divide(i, 2, MS_I32, 2);
    EXPECT(i[0] == 3 && i[1] == -3);
    uint16_t h[1] = {bf16_bits(3.0f)};
    ms_comm_divide(h, 1, MS_BF16, 4);
    EXPECT(bf16_value(h[0]) == 0.75f);
    EXPECT(strcmp(ms_comm_op_name(MS_DIST_AVG), "avg") == 0);
    EXPECT(strcmp(ms_comm_op_name(9), "?") == 0);
}

int main(void)
{
    test_against_reference();
    test_nan_propagates();
    test_integers_wrap();
    test_half_rounds_once();
    test_divide();
    if (failures)
        fprintf(stderr, "test_comm_reduce: %d failures\n", failures);
    return failures != 0;
}
