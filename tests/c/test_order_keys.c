/* C tests of the order keys (kernels/order_keys.h) for f32, f64, f16 and bf16 against values
 * decoded here from the bit patterns: key order is float order, NaN wins max and min, and
 * every other value decodes back bit for bit. */
#include "order_keys.h"
#include "check.h"

typedef struct format {
    const char *name;
    int width;          /* bits per value */
    uint64_t sign;      /* the sign bit */
    uint64_t infinity;  /* +inf's pattern: every exponent bit */
    uint64_t (*key)(uint64_t bits, int for_max);
    uint64_t (*from_key)(uint64_t key);
    double (*value)(uint64_t bits); /* decoded independently of the keys */
} format;

static uint64_t f32_key(uint64_t bits, int for_max)
{
    return ms_k_f32_order_key((uint32_t)bits, for_max);
}
static uint64_t f64_key(uint64_t bits, int for_max) { return ms_k_f64_order_key(bits, for_max); }
static uint64_t f16_key(uint64_t bits, int for_max)
{
    return ms_k_f16_order_key((uint16_t)bits, for_max);
}
static uint64_t bf16_key(uint64_t bits, int for_max)
{
    return ms_k_bf16_order_key((uint16_t)bits, for_max);
}
static uint64_t from_key32(uint64_t key) { return ms_k_from_order_key32((uint32_t)key); }
static uint64_t from_key64(uint64_t key) { return ms_k_from_order_key64(key); }
static uint64_t from_key16(uint64_t key) { return ms_k_from_order_key16((uint32_t)key); }

static double f32_value(uint64_t bits)
{
    uint32_t narrow = (uint32_t)bits;
    float f;
    memcpy(&f, &narrow, sizeof f);
    return f;
}

static double f64_value(uint64_t bits)
{
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

static double bf16_value(uint64_t bits) { return f32_value(bits << 16); }

/* IEEE half: 1 sign, 5 exponent (bias 15), 10 mantissa bits. */
static double f16_value(uint64_t bits)
{
    int exponent = (int)(bits >> 10) & 0x1f, mantissa = (int)(bits & 0x3ff);
    double magnitude = exponent == 0x1f ? (mantissa ? NAN : INFINITY)
                       : exponent == 0  ? ldexp(mantissa, -24)
                                        : ldexp(1024 + mantissa, exponent - 25);
    return (bits & 0x8000) ? -magnitude : magnitude;
}

static const format formats[] = {
    {"f32", 32, 0x80000000u, 0x7f800000u, f32_key, from_key32, f32_value},
    {"f64", 64, 0x8000000000000000ull, 0x7ff0000000000000ull, f64_key, from_key64, f64_value},
    {"f16", 16, 0x8000u, 0x7c00u, f16_key, from_key16, f16_value},
    {"bf16", 16, 0x8000u, 0x7f80u, bf16_key, from_key16, bf16_value},
};

static uint64_t random_bits(const format *f)
{
    uint64_t high = (uint64_t)(test_uniform() * 4294967296.0);
    uint64_t low = (uint64_t)(test_uniform() * 4294967296.0);
    uint64_t bits = high << 32 | low;
    return f->width == 64 ? bits : bits & ((1ull << f->width) - 1);
}

static uint64_t random_nan(const format *f)
{
    uint64_t mantissa_mask = (f->infinity & ~(f->infinity - 1)) - 1; /* below the exponent */
    uint64_t payload = random_bits(f) & mantissa_mask;
    return (test_uniform() < 0.5 ? f->sign : 0) | f->infinity | (payload ? payload : 1);
}

static uint64_t random_number(const format *f)
{
    uint64_t bits;
    do
        bits = random_bits(f);
    while (isnan(f->value(bits)));
    return bits;
}

/* Float order, with -0 before +0 (the only distinct patterns of equal value). */
static const format *sorting;

static int compare_values(const void *pa, const void *pb)
{
    uint64_t a = *(const uint64_t *)pa, b = *(const uint64_t *)pb;
    double x = sorting->value(a), y = sorting->value(b);
    if (x != y)
        return x < y ? -1 : 1;
    return (signbit(y) != 0) - (signbit(x) != 0);
}

/* Every non-NaN pattern of a 16-bit format; for the wider ones, the edges of every range
 * (zeros, subnormals, normals, infinities), random patterns and their neighbours. */
static uint64_t *sample_values(const format *f, size_t *count)
{
    size_t capacity = 70000 * 4, n = 0;
    uint64_t *values = malloc(sizeof *values * capacity);
    if (f->width == 16) {
        for (uint64_t bits = 0; bits < 0x10000; bits++)
            if (!isnan(f->value(bits)))
                values[n++] = bits;
        *count = n;
        return values;
    }
    uint64_t lowest_normal = f->infinity & ~(f->infinity - 1);
    uint64_t edges[] = {0, 1, lowest_normal - 1, lowest_normal, f->infinity - 1, f->infinity};
    for (size_t e = 0; e < sizeof edges / sizeof *edges; e++) {
        values[n++] = edges[e];
        values[n++] = edges[e] | f->sign;
    }
    uint64_t one = f->width == 32 ? 0x3f800000u : 0x3ff0000000000000ull;
    values[n++] = one;
    values[n++] = one | f->sign;
    while (n + 3 <= capacity) {
        uint64_t bits = random_number(f);
        values[n++] = bits;
        uint64_t up = bits + 1, down = bits - 1;
        if (f->width == 32) {
            up &= 0xffffffffu;
            down &= 0xffffffffu;
        }
        if (!isnan(f->value(up)))
            values[n++] = up;
        if (!isnan(f->value(down)))
            values[n++] = down;
    }
    *count = n;
    return values;
}

static void test_order_and_round_trip(const format *f)
{
    size_t n = 0;
    uint64_t *values = sample_values(f, &n);
    sorting = f;
    qsort(values, n, sizeof *values, compare_values);
    int misordered = 0, not_inverse = 0, too_wide = 0;
    for (size_t i = 0; i < n; i++) {
        for (int for_max = 0; for_max < 2; for_max++) {
            uint64_t key = f->key(values[i], for_max);
            not_inverse += f->from_key(key) != values[i];
            too_wide += f->width == 16 && key > 0xffff;
            if (i > 0) {
                uint64_t previous = f->key(values[i - 1], for_max);
                misordered += values[i] == values[i - 1] ? previous != key : previous >= key;
            }
        }
    }
    CHECK_MSG(misordered == 0, "%s: %d neighbours in float order have keys out of order",
              f->name, misordered);
    CHECK_MSG(not_inverse == 0, "%s: %d values do not decode back bit for bit", f->name,
              not_inverse);
    CHECK_MSG(too_wide == 0, "%s: %d keys use more than 16 bits", f->name, too_wide);
    CHECK_MSG(n > 60000, "%s: only %zu values sampled", f->name, n);
    free(values);
}

/* Integer max or min of keys over a set, decoded. */
static uint64_t reduce_through_keys(const format *f, const uint64_t *set, int size, int for_max)
{
    uint64_t best = f->key(set[0], for_max);
    for (int k = 1; k < size; k++) {
        uint64_t key = f->key(set[k], for_max);
        if (for_max ? key > best : key < best)
            best = key;
    }
    return f->from_key(best);
}

static void test_reductions(const format *f)
{
    int nan_lost = 0, wrong = 0;
    for (int trial = 0; trial < 20000; trial++) {
        uint64_t set[8];
        int size = 1 + (int)(test_uniform() * 8);
        int with_nan = trial % 2;
        for (int k = 0; k < size; k++)
            set[k] = test_uniform() < 0.25 ? random_nan(f) : random_number(f);
        if (with_nan)
            set[(int)(test_uniform() * size)] = random_nan(f);
        else
            for (int k = 0; k < size; k++)
                if (isnan(f->value(set[k])))
                    set[k] = random_number(f);
        for (int for_max = 0; for_max < 2; for_max++) {
            double got = f->value(reduce_through_keys(f, set, size, for_max));
            if (with_nan) {
                nan_lost += !isnan(got);
                continue;
            }
            double want = f->value(set[0]);
            for (int k = 1; k < size; k++) {
                double v = f->value(set[k]);
                want = for_max ? (v > want ? v : want) : (v < want ? v : want);
            }
            wrong += got != want;
        }
    }
    CHECK_MSG(nan_lost == 0, "%s: %d max/min of sets holding a NaN were not NaN", f->name,
              nan_lost);
    CHECK_MSG(wrong == 0, "%s: %d max/min of NaN-free sets differ from float max/min",
              f->name, wrong);
}

/* Every NaN pattern's key lies beyond the infinity on the side its reduction picks. */
static void test_nan_keys(const format *f)
{
    int beyond_infinity = 1;
    uint64_t key_pos_inf = f->key(f->infinity, 1), key_neg_inf = f->key(f->infinity | f->sign, 0);
    for (int trial = 0; trial < 10000; trial++) {
        uint64_t nan = random_nan(f);
        beyond_infinity &= f->key(nan, 1) > key_pos_inf && f->key(nan, 0) < key_neg_inf;
        beyond_infinity &= isnan(f->value(f->from_key(f->key(nan, trial % 2))));
    }
    CHECK_MSG(beyond_infinity, "%s: a NaN's key does not win over the infinities", f->name);
}

int main(void)
{
    test_seed(7);
    for (size_t i = 0; i < sizeof formats / sizeof *formats; i++) {
        test_order_and_round_trip(&formats[i]);
        test_reductions(&formats[i]);
        test_nan_keys(&formats[i]);
    }
    return check_summary("test_order_keys");
}
