//! Shortest round-trip text for float32 vectors, written fast.
//!
//! An `encoding_format=float` reply holds 1,536 numbers per vector, so the per-number cost of a
//! general formatter dominates the reply. zmij, the fastest general one, handles every
//! notation, copies a variable number of bytes, and its branches on digit counts mispredict on
//! a vector's random values (figures in benches/README.md). This writer does the same work for
//! the values embeddings are made of without data-dependent branches, and hands everything else
//! to zmij.
//!
//! The text is byte for byte zmij's `format_finite(f32)`: `0.0123`, `-0.5`, `1.0`, `1e-7`,
//! `3.4028235e+38`. An ignored test compares all 2^32 bit patterns
//! (`cargo test --release --lib float_text -- --ignored`), so replies look exactly as they did
//! when zmij wrote them.
//!
//! # Converting a value
//!
//! The decimal conversion is zmij's own for f32 (Schubfach with Xiang JunBo's extra-digit
//! shortcut), specialised to float32 with a table indexed by the raw binary exponent. A value
//! `v = sig × 2^bin_exp` is scaled by `10^-(dec_exp + 1)`, `dec_exp = ⌊log10 2^bin_exp⌋`, into
//! `c`, a fixed-point number with `FRACTION_BITS` fractional bits whose integral part has 6 to
//! 8 digits. The reals that round to `v`, scaled the same way, are `c ± half an ulp`. If they
//! include an integer (at most one: an ulp is under 1 here), that integer, one digit short of
//! full precision, is the shortest text; otherwise the text is `c` to one decimal place (at
//! most 9 significant digits, enough for any float32). Trailing zeros are dropped when it is
//! written.
//!
//! # Writing the text
//!
//! The fast path covers the notation zmij uses for `1e-6 ≤ |v| < 1`: `0.`, up to five zeros,
//! then the digits. Each of `c`'s digit places has a fixed place in that text, so the writer
//! stores a `0.00000` prefix, the integral part as eight ASCII digits (leading zeros included)
//! at a position that depends only on the binary exponent, and the extra digit after them, all
//! at fixed widths, and advances by the real length. Values go through in blocks of `BLOCK`:
//! converting the whole block first, then making digits four values at a time (SSE2 on x86_64,
//! which moves that work off the integer units the conversion keeps busy), then writing, keeps
//! each loop short and branch-free. A block holding any value the fast path does not cover
//! (zero, subnormals, powers of two, whose rounding interval is lopsided, values outside
//! `[1e-6, 1)`, infinities and NaN) is written by zmij (or as `null`) instead.

/// The longest text of one value: `-0.000001` and eight more digits (zmij's other forms are
/// shorter: `-1.1754944e-38`, `-1234567900000.0`). No write for a value reaches past it.
pub const MAX_LEN: usize = 17;

/// Bytes reserved per value of an array: its text and the `,` after it.
const SLOT: usize = MAX_LEN + 1;

/// Values converted together; a multiple of 4 (the digit step takes four at a time).
const BLOCK: usize = 16;

/// Fills the last, partial block: any value on the fast path does (its text is not written).
const PAD: f32 = 0.1;

/// Fractional bits of the scaled value `c` (zmij's for f32: enough for the half-ulp comparisons
/// and the extra digit, with `c` still in 64 bits).
const FRACTION_BITS: u32 = 34;
const ONE: u64 = 1 << FRACTION_BITS;
const FRACTION_MASK: u64 = ONE - 1;

/// float32's layout: 23 stored significand bits and 8 exponent bits, biased by 127.
const SIG_BITS: u32 = 23;
const IMPLICIT_BIT: u32 = 1 << SIG_BITS;
const SIG_MASK: u32 = IMPLICIT_BIT - 1;
const RAW_EXP_MASK: u32 = 0xff;
/// `v = sig × 2^(raw_exp - EXP_OFFSET)` for a normal value, implicit bit included in `sig`.
const EXP_OFFSET: i32 = 127 + SIG_BITS as i32;

/// The powers of ten of the leading digit for which zmij writes `0.000…digits`, the fast
/// path's notation (below: `1.5e-7`; above: `1.5`).
const FAST_EXP10_MIN: i32 = -6;
const FAST_EXP10_MAX: i32 = -1;

/// The range of digit counts the integral part of `c` can have (see the module doc).
const INTEGRAL_DIGITS_MIN: i32 = 6;
const INTEGRAL_DIGITS_MAX: i32 = 8;

/// `0.` and zeros, with and without the sign: stored first, then overwritten from the digits'
/// position on.
const PREFIXES: [[u8; 8]; 2] = [*b"0.000000", *b"-0.00000"];

/// `'0' ^ '.'`: turns a digit `0` into the decimal point.
const ZERO_TO_POINT: u64 = (b'0' ^ b'.') as u64;

/// What the conversion needs to know about one binary exponent.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Scale {
    /// `10^-(dec_exp + 1)`'s top 64 bits rounded down, plus one: a bound from above, as zmij
    /// uses, so the product never falls short of the exact one.
    pow10: u64,
    /// Half an ulp of the value in `c`'s units, plus one unit: an even significand's rounding
    /// interval includes its ends, an odd one's does not (it subtracts the unit again).
    half_ulp_even: u64,
    /// The integral parts (after rounding) that put the leading digit in the fast path's
    /// range: `fast_min..fast_min + fast_span`; empty when the exponent has none.
    fast_min: u32,
    fast_span: u32,
    /// Left shift of the significand before the multiplication, so that the high half of the
    /// 128-bit product is `c` with [`FRACTION_BITS`] fractional bits.
    shift: u32,
}

/// Where one binary exponent's digits go in the fast path's text.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Layout {
    /// Index, after the sign, of the first of the integral part's eight digit places (the one
    /// for `10^(dec_exp + 8)`). In `0.d₁d₂…` the digit for `10^-j` sits at index `1 + j`;
    /// counted that way, the places for `10^1` and `10^0` (both zero when `v < 1`) come out at
    /// indices 0 and 1, where the text has its `0` and `.`.
    word_at: usize,
    /// Restores the `.` at index 1 when the integral part's leading zeros cover it.
    point_fix: u64,
}

/// One entry per raw exponent. Entries 0 (zero, subnormals) and 255 (infinities, NaN) have an
/// empty fast range, so their values take the slow path; the rest of them only keeps computing
/// with them harmless (`c` is 0, and an odd significand can subtract its unit).
static SCALES: [Scale; 256] = {
    let mut table = [Scale {
        pow10: 0,
        half_ulp_even: 1,
        fast_min: 0,
        fast_span: 0,
        shift: 0,
    }; 256];
    let mut raw_exp = 1;
    while raw_exp < 255 {
        table[raw_exp as usize] = scale(raw_exp);
        raw_exp += 1;
    }
    table
};

static LAYOUTS: [Layout; 256] = {
    let mut table = [Layout {
        word_at: 0,
        point_fix: 0,
    }; 256];
    let mut raw_exp = 1;
    while raw_exp < 255 {
        table[raw_exp as usize] = layout(raw_exp);
        raw_exp += 1;
    }
    table
};

/// `⌊log10 2^bin_exp⌋` for a normal value's exponent, by zmij's fixed-point multiplication
/// (exact over this range).
const fn dec_exp(raw_exp: i32) -> i32 {
    ((raw_exp - EXP_OFFSET) * 315_653) >> 20
}

const fn scale(raw_exp: i32) -> Scale {
    let bin_exp = raw_exp - EXP_OFFSET;
    let dec_exp = dec_exp(raw_exp);
    let (pow10, pow10_exp) = pow10(-dec_exp - 1);
    // c × 2^FRACTION_BITS = sig × 2^bin_exp × pow10 × 2^(pow10_exp - 63) × 2^FRACTION_BITS,
    // which is (pow10 × (sig << shift)) >> 64 for this shift.
    let shift = bin_exp + pow10_exp - 63 + FRACTION_BITS as i32 + 64;
    // The significand (SIG_BITS + 1 bits), shifted, stays within 64 bits.
    assert!(shift > 0 && shift + (SIG_BITS as i32) < 64);
    // Half an ulp, 2^(bin_exp - 1), scaled the same way.
    let half_ulp = pow10 >> (65 - shift);
    // The leading digit is at 10^(dec_exp + digits of the integral part).
    let min_digits = max(INTEGRAL_DIGITS_MIN, FAST_EXP10_MIN - dec_exp);
    let max_digits = min(INTEGRAL_DIGITS_MAX, FAST_EXP10_MAX - dec_exp);
    let (fast_min, fast_span) = if min_digits <= max_digits {
        let from = 10u32.pow(min_digits as u32 - 1);
        (from, 10u32.pow(max_digits as u32) - from)
    } else {
        (0, 0)
    };
    Scale {
        pow10: pow10 + 1,
        half_ulp_even: half_ulp + 1,
        fast_min,
        fast_span,
        shift: shift as u32,
    }
}

const fn layout(raw_exp: i32) -> Layout {
    if scale(raw_exp).fast_span == 0 {
        return Layout {
            word_at: 0,
            point_fix: 0,
        };
    }
    // Index 1 + j holds 10^-j, so 10^(dec_exp + 8) is at 1 - (dec_exp + 8); between 0 and 7
    // for exponents with a fast range, the prefix and digits thus fitting in MAX_LEN.
    let word_at = -7 - dec_exp(raw_exp);
    assert!(0 <= word_at && word_at <= 7);
    // The digit byte that landed on index 1 becomes the point.
    let point_fix = match word_at {
        0 => ZERO_TO_POINT << 8,
        1 => ZERO_TO_POINT,
        _ => 0,
    };
    Layout {
        word_at: word_at as usize,
        point_fix,
    }
}

const fn max(a: i32, b: i32) -> i32 {
    if a > b {
        a
    } else {
        b
    }
}

const fn min(a: i32, b: i32) -> i32 {
    if a < b {
        a
    } else {
        b
    }
}

/// `10^k` as `(significand, exponent)`: the top 64 bits of its binary expansion rounded down,
/// and `⌊log2 10^k⌋`, so `10^k ≈ significand × 2^(exponent - 63)`. Exact arithmetic: `10^k` is
/// `5^k × 2^k`, and `5^|k|` fits in a u128 for the |k| ≤ 45 float32 needs.
const fn pow10(k: i32) -> (u64, i32) {
    let m = k.unsigned_abs();
    assert!(m <= 50);
    let mut five: u128 = 1;
    let mut i = 0;
    while i < m {
        five *= 5;
        i += 1;
    }
    // 2^(bits - 1) ≤ 5^m < 2^bits.
    let bits = 128 - five.leading_zeros() as i32;
    if k >= 0 {
        let top = if bits > 64 {
            (five >> (bits - 64)) as u64
        } else {
            (five << (64 - bits)) as u64
        };
        return (top, k + bits - 1);
    }
    // 5^-m lies strictly between 2^-bits and 2^-(bits - 1) (5^m is no power of two): its top
    // 64 bits are ⌊2^(bits + 63) / 5^m⌋, here by long division, one bit at a time.
    let mut quotient: u128 = 0;
    let mut remainder: u128 = 1;
    let mut step = 0;
    while step < bits + 64 {
        quotient <<= 1;
        if remainder >= five {
            remainder -= five;
            quotient |= 1;
        }
        remainder <<= 1;
        step += 1;
    }
    assert!(quotient >> 63 == 1);
    (quotient as u64, k - bits)
}

/// A value on the fast path, converted.
struct Decimal {
    /// `c`'s integral part, or the integer within half an ulp of `c`.
    integral: u32,
    /// `c`'s first fractional digit, rounded, as ASCII; part of the text only with `has_digit`.
    digit: u8,
    has_digit: bool,
}

/// Converts a value, or says that the fast path does not cover it.
#[inline(always)]
fn to_decimal(bits: u32) -> Option<Decimal> {
    let scale = &SCALES[((bits >> SIG_BITS) & RAW_EXP_MASK) as usize];
    let stored_sig = bits & SIG_MASK;
    let sig = u64::from(stored_sig | IMPLICIT_BIT);
    let c = ((u128::from(scale.pow10) * u128::from(sig << scale.shift)) >> 64) as u64;
    let half_ulp = scale.half_ulp_even - (sig & 1);
    // The integer within half an ulp above `c`, if there is one, is `c`'s integral part plus
    // one: adding half an ulp carries into the integral part exactly then.
    let integral = (c + half_ulp) >> FRACTION_BITS;
    if (integral as u32).wrapping_sub(scale.fast_min) >= scale.fast_span || stored_sig == 0 {
        return None;
    }
    let fraction = c & FRACTION_MASK;
    // No integer within half an ulp, above or below: half_ulp ≤ fraction < ONE - half_ulp.
    let has_digit = fraction.wrapping_sub(half_ulp) < ONE - 2 * half_ulp;
    // Rounded half up, except exactly .25 (2.5 goes to 2, to even): zmij's rule.
    let digit = ((fraction * 10 + ONE / 2) >> FRACTION_BITS) - u64::from(fraction == ONE / 4);
    Some(Decimal {
        integral: integral as u32,
        digit: b'0' + digit as u8,
        has_digit,
    })
}

/// The text's length from the integral part's first place: 9 with the extra digit, otherwise
/// up to the integral part's last non-zero digit. `[has_digit][kept]`.
const TEXT_TAIL: [[u8; 9]; 2] = [[0, 1, 2, 3, 4, 5, 6, 7, 8], [9; 9]];

/// Four integral parts (each below 10^8) as eight ASCII digits each, leading zeros included,
/// the first in the lowest byte; and for each, how many of those digits remain once trailing
/// zeros go.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn eight_digits_x4(n: [u32; 4]) -> ([u64; 4], [u8; 4]) {
    use std::arch::x86_64::*;
    // Each step divides every lane by a power of ten at once (a multiply-high and a shift,
    // exact over the lane's range) and puts quotient and remainder into the lane's halves,
    // quotient first: 8 digits → 4 + 4 in 32-bit lanes, → 2 + 2 in 16-bit lanes, → 1 + 1 in
    // bytes.
    // SAFETY: SSE2 is part of x86_64's baseline, so its intrinsics are always available. The
    // transmutes read 16 bytes as two u64s: same size, and every bit pattern is a valid u64.
    unsafe {
        let x = _mm_set_epi32(n[3] as i32, n[2] as i32, n[1] as i32, n[0] as i32);
        // ⌊x / 10^4⌋ = (x × 109951163) >> 40 for x < 10^8; the multiplication takes lanes 0
        // and 2, so lanes 1 and 3 are shifted down for a second one.
        let div_10k = _mm_set1_epi64x(109_951_163);
        let hi_02 = _mm_srli_epi64(_mm_mul_epu32(x, div_10k), 40);
        let hi_13 = _mm_srli_epi64(_mm_mul_epu32(_mm_srli_epi64(x, 32), div_10k), 40);
        let hi = _mm_or_si128(hi_02, _mm_slli_epi64(hi_13, 32));
        // hi × 10^4 fits the 16 × 16-bit multiply-add (hi < 10^4 < 2^15).
        let lo = _mm_sub_epi32(x, _mm_madd_epi16(hi, _mm_set1_epi32(10_000)));
        let split = |y: __m128i| {
            // ⌊y / 100⌋ = (y × 5243) >> 19 for y < 10^4.
            let q = _mm_srli_epi16(_mm_mulhi_epu16(y, _mm_set1_epi32(5_243)), 3);
            let r = _mm_sub_epi16(y, _mm_mullo_epi16(q, _mm_set1_epi32(100)));
            let y = _mm_or_si128(q, _mm_slli_epi32(r, 16));
            // ⌊z / 10⌋ = (z × 6554) >> 16 for z < 100.
            let q = _mm_mulhi_epu16(y, _mm_set1_epi16(6_554));
            let r = _mm_sub_epi16(y, _mm_mullo_epi16(q, _mm_set1_epi16(10)));
            _mm_or_si128(q, _mm_slli_epi16(r, 8))
        };
        // Values 0 and 1, then 2 and 3, each as [high four, low four] digits.
        let digits = [
            split(_mm_unpacklo_epi32(hi, lo)),
            split(_mm_unpackhi_epi32(hi, lo)),
        ];
        let mut words = [0u64; 4];
        let mut kept = [0u8; 4];
        for (half, d) in digits.into_iter().enumerate() {
            let zeros = _mm_movemask_epi8(_mm_cmpeq_epi8(d, _mm_setzero_si128())) as usize;
            kept[2 * half] = KEPT_DIGITS[zeros & 0xff];
            kept[2 * half + 1] = KEPT_DIGITS[zeros >> 8];
            let ascii = _mm_or_si128(d, _mm_set1_epi8(b'0' as i8));
            let [first, second] = std::mem::transmute::<__m128i, [u64; 2]>(ascii);
            words[2 * half] = first;
            words[2 * half + 1] = second;
        }
        (words, kept)
    }
}

/// Digits kept of eight, by which of them are zero (bit i: digit i): up to the last non-zero.
#[cfg(target_arch = "x86_64")]
const KEPT_DIGITS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut zeros = 0;
    while zeros < 256 {
        let mut kept = 8;
        while kept > 0 && (zeros >> (kept - 1)) & 1 == 1 {
            kept -= 1;
        }
        table[zeros] = kept as u8;
        zeros += 1;
    }
    table
};

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn eight_digits_x4(n: [u32; 4]) -> ([u64; 4], [u8; 4]) {
    let digits = n.map(eight_digits);
    (digits.map(|d| d.0), digits.map(|d| d.1))
}

/// One integral part's eight ASCII digits and kept count, as [`eight_digits_x4`] gives four,
/// with 64-bit arithmetic (SWAR) in place of SSE2: the same three steps, quotient and remainder
/// of every lane in one multiply-and-subtract.
#[cfg(any(test, not(target_arch = "x86_64")))]
#[inline(always)]
fn eight_digits(n: u32) -> (u64, u8) {
    let n = u64::from(n);
    // n = 10^4·hi + lo  →  lo·2^32 + hi.
    let hi = (n * 109_951_163) >> 40;
    let v = (n << 32) - ((10_000 << 32) - 1) * hi;
    // Each 32-bit lane y = 100·hi + lo  →  lo·2^16 + hi.
    let hi = ((v * 5_243) >> 19) & 0x0000_007f_0000_007f;
    let v = (v << 16) - ((100 << 16) - 1) * hi;
    // Each 16-bit lane z = 10·hi + lo  →  lo·2^8 + hi.
    let hi = ((v * 103) >> 10) & 0x000f_000f_000f_000f;
    let v = (v << 8) - ((10 << 8) - 1) * hi;
    // Trailing zero digits are the word's high zero bytes.
    let kept = 8 - (v.leading_zeros() / 8) as u8;
    (v | 0x3030_3030_3030_3030, kept)
}

/// Writes `values[..count]`, each followed by `,`, at `dst` and returns the length; or returns
/// `None` without writing if any of the block's values is off the fast path.
///
/// # Safety
///
/// `dst` must be valid for writes of `count × SLOT` bytes.
#[inline(always)]
unsafe fn write_fast_block(values: &[f32; BLOCK], count: usize, dst: *mut u8) -> Option<usize> {
    let mut words = [0u64; BLOCK];
    let mut kept = [0u8; BLOCK];
    let mut digits = [0u8; BLOCK];
    let mut has_digit = [false; BLOCK];
    for group in 0..BLOCK / 4 {
        let mut integrals = [0u32; 4];
        for (k, integral) in integrals.iter_mut().enumerate() {
            let i = 4 * group + k;
            let decimal = to_decimal(values[i].to_bits())?;
            *integral = decimal.integral;
            digits[i] = decimal.digit;
            has_digit[i] = decimal.has_digit;
        }
        let (w, k) = eight_digits_x4(integrals);
        words[4 * group..4 * group + 4].copy_from_slice(&w);
        kept[4 * group..4 * group + 4].copy_from_slice(&k);
    }
    let mut len = 0;
    for i in 0..count {
        let bits = values[i].to_bits();
        let negative = (bits >> 31) as usize;
        let layout = &LAYOUTS[((bits >> SIG_BITS) & RAW_EXP_MASK) as usize];
        let word_at = negative + layout.word_at;
        let text_len =
            word_at + usize::from(TEXT_TAIL[usize::from(has_digit[i])][usize::from(kept[i])]);
        // SAFETY: `len` ≤ i × SLOT, and this value's writes stay within the SLOT bytes from
        // it: the prefix takes indices 0..8, the word `word_at..word_at + 8` and the digit
        // `word_at + 8`, with `word_at` ≤ 1 + 7, so all end within MAX_LEN; the `,` goes to
        // `text_len` ≤ `word_at + 9` ≤ MAX_LEN < SLOT. Those stores leave no gap before the
        // `,` (the word starts by index 8), so every byte of the text is written.
        unsafe {
            let at = dst.add(len);
            at.cast::<[u8; 8]>().write_unaligned(PREFIXES[negative]);
            at.add(word_at)
                .cast::<[u8; 8]>()
                .write_unaligned((words[i] ^ layout.point_fix).to_le_bytes());
            *at.add(word_at + 8) = digits[i];
            *at.add(text_len) = b',';
        }
        len += text_len + 1;
    }
    Some(len)
}

/// Writes `values[..count]`, each followed by `,`, at `dst` and returns the length.
///
/// # Safety
///
/// `dst` must be valid for writes of `count × SLOT` bytes.
#[inline(always)]
unsafe fn write_block(values: &[f32; BLOCK], count: usize, dst: *mut u8) -> usize {
    // SAFETY: the caller's guarantee, passed on.
    if let Some(len) = unsafe { write_fast_block(values, count, dst) } {
        return len;
    }
    let mut len = 0;
    for &value in &values[..count] {
        // SAFETY: as above; each value takes at most MAX_LEN bytes and its `,` one more.
        unsafe {
            len += write_slow(value, dst.add(len));
            *dst.add(len) = b',';
        }
        len += 1;
    }
    len
}

/// zmij's text, or `null` for a non-finite value.
///
/// # Safety
///
/// `dst` must be valid for writes of [`MAX_LEN`] bytes.
#[cold]
#[inline(never)]
unsafe fn write_slow(value: f32, dst: *mut u8) -> usize {
    let mut buf = zmij::Buffer::new();
    let text = if value.is_finite() {
        buf.format_finite(value).as_bytes()
    } else {
        b"null"
    };
    let len = text.len().min(MAX_LEN);
    debug_assert_eq!(len, text.len());
    // SAFETY: `dst` is valid for MAX_LEN bytes, and `text` is another object.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), dst, len) };
    len
}

/// Bytes `write_json_array` reserves for an array of `len` values: what a caller sizing a
/// buffer for several arrays should allow.
pub fn reserve_for(len: usize) -> usize {
    len * SLOT + 2
}

/// Appends `[v,v,...]` to `out`: each value as its shortest round-trip text (zmij's), `null`
/// for a non-finite one (JSON has no NaN or infinity).
pub fn write_json_array(out: &mut Vec<u8>, values: &[f32]) {
    // Room for the brackets and every value's slot, reserved once, so that no write checks.
    let reserved = reserve_for(values.len());
    out.reserve(reserved);
    let start = out.spare_capacity_mut().as_mut_ptr().cast::<u8>();
    let mut len = 1;
    // SAFETY: `start` is valid for `reserved` bytes of writes. The `[` takes one, each value
    // writes its text and `,` within the SLOT bytes from where it starts (the last block's
    // padding is converted, not written), and the `]` overwrites the last `,` (or follows the
    // `[`). Every byte up to `close` has then been written, so they may join the vector.
    unsafe {
        *start = b'[';
        let mut blocks = values.chunks_exact(BLOCK);
        for block in &mut blocks {
            let block = block.try_into().expect("chunks of BLOCK values");
            len += write_block(block, BLOCK, start.add(len));
        }
        let rest = blocks.remainder();
        if !rest.is_empty() {
            let mut padded = [PAD; BLOCK];
            padded[..rest.len()].copy_from_slice(rest);
            len += write_block(&padded, rest.len(), start.add(len));
        }
        let close = len - usize::from(!values.is_empty());
        debug_assert!(close < reserved);
        *start.add(close) = b']';
        out.set_len(out.len() + close + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: zmij's text for each value (`null` for a non-finite one), as an array.
    fn zmij_array(values: &[f32]) -> Vec<u8> {
        let mut out = vec![b'['];
        let mut buf = zmij::Buffer::new();
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if value.is_finite() {
                out.extend_from_slice(buf.format_finite(*value).as_bytes());
            } else {
                out.extend_from_slice(b"null");
            }
        }
        out.push(b']');
        out
    }

    fn our_array(values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        write_json_array(&mut out, values);
        out
    }

    fn our_text(value: f32) -> String {
        let array = String::from_utf8(our_array(&[value])).unwrap();
        array[1..array.len() - 1].to_string()
    }

    fn zmij_text(value: f32) -> String {
        let array = String::from_utf8(zmij_array(&[value])).unwrap();
        array[1..array.len() - 1].to_string()
    }

    /// The values whose text differs from zmij's, one by one, as (bits, ours, zmij).
    fn mismatches(values: &[f32]) -> Vec<(u32, String, String)> {
        values
            .iter()
            .map(|&v| (v.to_bits(), our_text(v), zmij_text(v)))
            .filter(|(_, ours, zmij)| ours != zmij)
            .collect()
    }

    /// Compares an array with zmij's, and on a difference names the values.
    fn assert_like_zmij(values: &[f32]) {
        if our_array(values) != zmij_array(values) {
            let wrong = mismatches(values);
            panic!(
                "{} of {} values differ from zmij (bits, ours, zmij), first: {:?}",
                wrong.len(),
                values.len(),
                &wrong[..wrong.len().min(10)]
            );
        }
    }

    /// splitmix64: deterministic, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    /// Zero, the ends of the range, every power of two and of ten, where zmij's notation
    /// switches, values with trailing zeros, each with its neighbours and its negation.
    fn edge_cases() -> Vec<f32> {
        let mut centres = vec![
            0.0,
            f32::from_bits(1),
            f32::from_bits(SIG_MASK),
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::EPSILON,
            0.5,
            100.0,
            0.1,
            0.2,
            0.3,
            0.33333334,
            0.0069292834,
            0.00001,
            0.000001,
            9.999999e-7,
            0.99999994,
            1.0,
            1.5,
            123456789.0,
            1e12,
            1e13,
            PAD,
        ];
        centres.extend((1..255).map(|raw_exp| f32::from_bits(raw_exp << SIG_BITS)));
        centres.extend((-45..=38).map(|k| format!("1e{k}").parse::<f32>().unwrap()));
        let mut values = Vec::new();
        for centre in centres {
            for delta in -3i64..=3 {
                let bits = i64::from(centre.to_bits()) + delta;
                if let Ok(bits) = u32::try_from(bits) {
                    let value = f32::from_bits(bits);
                    values.extend([value, -value]);
                }
            }
        }
        values.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        values
    }

    #[test]
    fn powers_of_ten_are_exact_where_they_can_be() {
        assert_eq!(pow10(0), (1 << 63, 0));
        assert_eq!(pow10(1), (0xa000_0000_0000_0000, 3));
        assert_eq!(pow10(27), (0xcecb_8f27_f420_0f3a, 89));
        // 10^-1 = 0.1100110011…b × 2^-3.
        assert_eq!(pow10(-1), (0xcccc_cccc_cccc_cccc, -4));
    }

    #[test]
    fn eight_digits_are_the_decimal_digits() {
        for n in [
            0, 1, 7, 10, 12_345_678, 10_000_000, 99_999_999, 1_000, 50_000_000,
        ] {
            let (word, kept) = eight_digits(n);
            let expected = format!("{n:08}");
            assert_eq!(&word.to_le_bytes(), expected.as_bytes(), "{n}");
            assert_eq!(
                usize::from(kept),
                expected.trim_end_matches('0').len(),
                "{n}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sse2_digits_agree_with_the_portable_ones() {
        let mut rng = Rng(7);
        let check = |n: [u32; 4]| {
            let (words, kept) = eight_digits_x4(n);
            for i in 0..4 {
                assert_eq!((words[i], kept[i]), eight_digits(n[i]), "{}", n[i]);
            }
        };
        check([0, 1, 99_999_999, 10_000_000]);
        check([1_000_000, 120_000, 9_000_001, 45_600_000]);
        for _ in 0..100_000 {
            check([0; 4].map(|_| (rng.next() % 100_000_000) as u32));
        }
    }

    #[test]
    fn edge_cases_match_zmij() {
        let values = edge_cases();
        assert_like_zmij(&values);
        assert_eq!(our_text(-0.0), "-0.0");
        assert_eq!(our_text(1e-7), "1e-7");
        assert_eq!(our_text(0.000001), "0.000001");
        assert_eq!(our_text(f32::MAX), "3.4028235e+38");
        assert_eq!(our_text(f32::NAN), "null");
    }

    #[test]
    fn random_bit_patterns_match_zmij() {
        let mut rng = Rng(1);
        let values: Vec<f32> = (0..2_000_000)
            .map(|_| f32::from_bits(rng.next() as u32))
            .collect();
        for chunk in values.chunks(1000) {
            assert_like_zmij(chunk);
        }
    }

    #[test]
    fn random_embedding_values_match_zmij() {
        // Values of every magnitude the fast path covers, and either side of it.
        let mut rng = Rng(2);
        let values: Vec<f32> = (0..1_000_000)
            .map(|_| {
                let raw_exp = 100 + (rng.next() % 30) as u32; // about 7e-9 to 1.9
                let bits = (rng.next() as u32 & (1 << 31 | SIG_MASK)) | raw_exp << SIG_BITS;
                f32::from_bits(bits)
            })
            .collect();
        for chunk in values.chunks(1000) {
            assert_like_zmij(chunk);
        }
    }

    #[test]
    fn arrays_of_any_length_and_mix_are_well_formed() {
        let mut rng = Rng(3);
        let specials = [f32::NAN, f32::INFINITY, 0.0, -0.0, 1e-7, 1.5, 0.25];
        let mut out = b"prefix".to_vec();
        for len in 0..100 {
            let values: Vec<f32> = (0..len)
                .map(|_| match rng.next() % 8 {
                    0 => specials[(rng.next() % specials.len() as u64) as usize],
                    _ => (rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 0.2 - 0.1,
                })
                .collect();
            assert_like_zmij(&values);
            // Appends, leaving what the buffer held.
            out.truncate(6);
            write_json_array(&mut out, &values);
            assert_eq!(&out[..6], b"prefix");
            assert_eq!(&out[6..], &zmij_array(&values)[..]);
        }
        assert_eq!(our_array(&[]), b"[]");
    }

    #[test]
    fn text_parses_back_to_the_same_float32() {
        let mut rng = Rng(4);
        let mut values = edge_cases();
        values.extend((0..200_000).map(|_| f32::from_bits(rng.next() as u32)));
        values.extend(
            (0..200_000).map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 0.2 - 0.1),
        );
        let parsed: Vec<Option<f64>> = serde_json::from_slice(&our_array(&values)).unwrap();
        for (value, parsed) in values.iter().zip(parsed) {
            match parsed {
                Some(p) => assert_eq!((p as f32).to_bits(), value.to_bits(), "{value:e}"),
                None => assert!(!value.is_finite()),
            }
            assert!(our_text(*value).len() <= MAX_LEN);
        }
    }

    /// All 2^32 bit patterns against zmij, byte for byte, a few minutes on one core:
    /// `cargo test --release --lib float_text -- --ignored`. To leave the other core free:
    /// `taskset -c 1 nice -n 10 cargo test --release --lib float_text -- --ignored
    /// --test-threads 1`.
    #[test]
    #[ignore = "exhaustive, minutes in release"]
    fn every_float32_matches_zmij() {
        const CHUNK: u64 = 1 << 16;
        let mut values = Vec::with_capacity(CHUNK as usize);
        let mut ours = Vec::new();
        let mut finite = 0u64;
        let mut wrong = Vec::new();
        for start in (0..1u64 << 32).step_by(CHUNK as usize) {
            values.clear();
            values.extend((start..start + CHUNK).map(|bits| f32::from_bits(bits as u32)));
            finite += values.iter().filter(|v| v.is_finite()).count() as u64;
            ours.clear();
            write_json_array(&mut ours, &values);
            if ours != zmij_array(&values) {
                wrong.extend(mismatches(&values));
            }
        }
        eprintln!(
            "{finite} finite values (and {} non-finite) compared with zmij: {} differ",
            (1u64 << 32) - finite,
            wrong.len()
        );
        assert!(
            wrong.is_empty(),
            "first: {:?}",
            &wrong[..wrong.len().min(20)]
        );
    }
}
