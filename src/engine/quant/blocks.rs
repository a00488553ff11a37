//! ggml's block layouts as `#[repr(C)]` structs, so weights can be read in place from the GGUF mmap.
//!
//! Every field is a byte array (alignment 1), so a block slice can be borrowed from any byte offset of the
//! mmap without an alignment check, and multi-byte fields are read little-endian (as GGUF stores them).
//! Layouts and sizes: `ggml/src/ggml-common.h` of llama.cpp commit 0c1e570; each size is asserted at
//! compile time against ggml's `sizeof(block_*)`.

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};

/// Elements in a k-quant super-block (`QK_K`).
pub const QK_K: usize = 256;
/// Elements in a Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q8_1/IQ4_NL block (`QK4_0` … `QK8_1`, all 32).
pub const QK: usize = 32;

/// An IEEE half stored as two little-endian bytes (ggml's `ggml_half`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(transparent)]
pub struct F16Le(pub [u8; 2]);

impl F16Le {
    /// The value as f32 (exact).
    #[inline(always)]
    pub fn get(self) -> f32 {
        f16::from_bits(u16::from_le_bytes(self.0)).to_f32()
    }
    /// `v` rounded to the nearest half, ties to even (`GGML_FP32_TO_FP16`).
    #[inline(always)]
    pub fn from_f32(v: f32) -> Self {
        Self(f16::from_f32(v).to_bits().to_le_bytes())
    }
}

/// A bfloat16 stored as two little-endian bytes (`ggml_bf16_t`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(transparent)]
pub struct Bf16Le(pub [u8; 2]);

impl Bf16Le {
    /// The value as f32 (exact: the bits shifted left by 16, `ggml_bf16_to_fp32`).
    #[inline(always)]
    pub fn get(self) -> f32 {
        bf16::from_bits(u16::from_le_bytes(self.0)).to_f32()
    }
}

macro_rules! block {
    ($(#[$m:meta])* $name:ident, $size:expr, { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Pod, Zeroable)]
        #[repr(C)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        const _: () = assert!(std::mem::size_of::<$name>() == $size);
        const _: () = assert!(std::mem::align_of::<$name>() == 1);
    };
}

block!(
    /// `block_q4_0`: 32 weights `d * (q - 8)`, q in 0..16; `qs[j]` holds element j (low nibble) and j+16.
    BlockQ4_0, 18, { d: F16Le, qs: [u8; 16] });
block!(
    /// `block_q4_1`: 32 weights `d * q + m`, q in 0..16, nibbles as in Q4_0.
    BlockQ4_1, 20, { d: F16Le, m: F16Le, qs: [u8; 16] });
block!(
    /// `block_q5_0`: 32 weights `d * (q - 16)`, q in 0..32: low 4 bits as Q4_0, bit 4 of element j in bit j of
    /// the little-endian u32 `qh`.
    BlockQ5_0, 22, { d: F16Le, qh: [u8; 4], qs: [u8; 16] });
block!(
    /// `block_q5_1`: 32 weights `d * q + m`, q in 0..32, bits as Q5_0.
    BlockQ5_1, 24, { d: F16Le, m: F16Le, qh: [u8; 4], qs: [u8; 16] });
block!(
    /// `block_q8_0`: 32 weights `d * q`, q an i8.
    BlockQ8_0, 34, { d: F16Le, qs: [i8; 32] });
block!(
    /// `block_q8_1`: Q8_0 plus `s = d * Σq` (activations for Q4_1/Q5_1 dot products).
    BlockQ8_1, 36, { d: F16Le, s: F16Le, qs: [i8; 32] });
block!(
    /// `block_q2_K`: 256 weights in 16 groups of 16: `d * (scales & 15) * q - dmin * (scales >> 4)`, q 2 bits.
    BlockQ2K, 84, { scales: [u8; 16], qs: [u8; 64], d: F16Le, dmin: F16Le });
block!(
    /// `block_q3_K`: 256 weights in 16 groups of 16, 6-bit signed scales (packed in 12 bytes), q 3 bits
    /// (2 in `qs`, the high bit in `hmask`, set meaning "not minus 4").
    BlockQ3K, 110, { hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: F16Le });
block!(
    /// `block_q4_K`: 256 weights in 8 groups of 32 with 6-bit scales and mins packed in 12 bytes.
    BlockQ4K, 144, { d: F16Le, dmin: F16Le, scales: [u8; 12], qs: [u8; 128] });
block!(
    /// `block_q5_K`: Q4_K plus a fifth bit per weight in `qh`.
    BlockQ5K, 176, { d: F16Le, dmin: F16Le, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128] });
block!(
    /// `block_q6_K`: 256 weights in 16 groups of 16, `d * scales[g] * (q - 32)`, q 6 bits (4 in `ql`, 2 in `qh`).
    BlockQ6K, 210, { ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: F16Le });
block!(
    /// `block_q8_K`: activations for k-quant dot products: `d * q` (d an f32), and `bsums[g]` = Σq over each
    /// group of 16 (little-endian i16s).
    BlockQ8K, 292, { d: [u8; 4], qs: [i8; 256], bsums: [[u8; 2]; 16] });
block!(
    /// `block_iq4_nl`: 32 weights `d * KVALUES_IQ4NL[q]`, nibbles as in Q4_0.
    BlockIq4Nl, 18, { d: F16Le, qs: [u8; 16] });
block!(
    /// `block_iq4_xs`: 256 weights in 8 groups of 32, `d * (ls - 32) * KVALUES_IQ4NL[q]`, ls 6 bits (low 4 in
    /// `scales_l`, high 2 in `scales_h`).
    BlockIq4Xs, 136, { d: F16Le, scales_h: [u8; 2], scales_l: [u8; 4], qs: [u8; 128] });
block!(
    /// `block_mxfp4` (OCP microscaling FP4, gpt-oss): 32 weights `e8m0_to_fp32_half(e) * KVALUES_MXFP4[q]`,
    /// `e` a power-of-two scale (E8M0), q a 4-bit E2M1 code, nibbles as in Q4_0.
    BlockMxfp4, 17, { e: u8, qs: [u8; 16] });

impl BlockQ8K {
    /// The scale `d`.
    #[inline(always)]
    pub fn d(&self) -> f32 {
        f32::from_le_bytes(self.d)
    }
    /// `bsums[g]`, the sum of the 16 quants of group `g` (0..16).
    #[inline(always)]
    pub fn bsum(&self, g: usize) -> i16 {
        i16::from_le_bytes(self.bsums[g])
    }
}

/// IQ4_NL / IQ4_XS code book (`kvalues_iq4nl`, ggml-common.h).
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// MXFP4 code book: the E2M1 values doubled (`kvalues_mxfp4` = `kvalues_fp4`, ggml-common.h), so the block
/// scale is taken at half its value ([`e8m0_to_fp32_half`]).
pub const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half the value of an E8M0 scale, `2^(x - 128)` (`ggml_e8m0_to_fp32_half`, ggml-impl.h): exact, with the
/// subnormal bit patterns for `x < 2`.
#[inline(always)]
pub fn e8m0_to_fp32_half(x: u8) -> f32 {
    let bits = if x < 2 {
        0x0020_0000u32 << x
    } else {
        ((x as u32) - 1) << 23
    };
    f32::from_bits(bits)
}

/// Unpacks the 6-bit scale and min of group `j` (0..8) of a Q4_K/Q5_K block (`get_scale_min_k4`,
/// ggml-quants.c).
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Unpacks the 16 6-bit scales of a Q3_K block, each still offset by 32 (the `aux` shuffle of
/// `dequantize_row_q3_K`, ggml-quants.c).
#[inline(always)]
pub fn q3k_scales(s: &[u8; 12]) -> [i8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let a0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let a1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let tmp = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut out = [0i8; 16];
    for (i, w) in aux.iter().enumerate() {
        for (k, b) in w.to_le_bytes().iter().enumerate() {
            out[4 * i + k] = *b as i8;
        }
    }
    out
}

/// The 8 (scale, min) pairs of a Q4_K/Q5_K block.
#[inline(always)]
pub fn k4_scales_mins(q: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, q);
        sc[j] = s;
        mn[j] = m;
    }
    (sc, mn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ggml_type::GgmlType;

    #[test]
    fn sizes_match_ggml_type_sizes() {
        let pairs: [(GgmlType, usize); 15] = [
            (GgmlType::Q4_0, size_of::<BlockQ4_0>()),
            (GgmlType::Q4_1, size_of::<BlockQ4_1>()),
            (GgmlType::Q5_0, size_of::<BlockQ5_0>()),
            (GgmlType::Q5_1, size_of::<BlockQ5_1>()),
            (GgmlType::Q8_0, size_of::<BlockQ8_0>()),
            (GgmlType::Q8_1, size_of::<BlockQ8_1>()),
            (GgmlType::Q2_K, size_of::<BlockQ2K>()),
            (GgmlType::Q3_K, size_of::<BlockQ3K>()),
            (GgmlType::Q4_K, size_of::<BlockQ4K>()),
            (GgmlType::Q5_K, size_of::<BlockQ5K>()),
            (GgmlType::Q6_K, size_of::<BlockQ6K>()),
            (GgmlType::Q8_K, size_of::<BlockQ8K>()),
            (GgmlType::IQ4_NL, size_of::<BlockIq4Nl>()),
            (GgmlType::IQ4_XS, size_of::<BlockIq4Xs>()),
            (GgmlType::MXFP4, size_of::<BlockMxfp4>()),
        ];
        for (t, s) in pairs {
            assert_eq!(t.type_size(), s, "{t}");
        }
    }

    #[test]
    fn e8m0_half_is_a_power_of_two_halved() {
        assert_eq!(e8m0_to_fp32_half(127), 0.5);
        assert_eq!(e8m0_to_fp32_half(128), 1.0);
        assert_eq!(e8m0_to_fp32_half(130), 4.0);
        assert_eq!(e8m0_to_fp32_half(1), 2f32.powi(-127));
        assert_eq!(e8m0_to_fp32_half(0), 2f32.powi(-128));
        assert_eq!(e8m0_to_fp32_half(254), 2f32.powi(126));
    }

    #[test]
    fn q4k_scale_unpacking_matches_the_bit_layout() {
        // Scales 0..4 and mins 0..4 in the low 6 bits of bytes 0..8; groups 4..8 split across bytes 8..12
        // (low/high nibble) and the top 2 bits of bytes 0..8.
        let mut q = [0u8; 12];
        q[0] = 0b11_000101; // scale0 = 5, high bits 3 -> scale4 high
        q[4] = 0b10_000111; // min0 = 7, high bits 2 -> min4 high
        q[8] = 0x9A; // scale4 low = 0xA, min4 low = 0x9
        let (s, m) = scale_min_k4(0, &q);
        assert_eq!((s, m), (5, 7));
        let (s, m) = scale_min_k4(4, &q);
        assert_eq!((s, m), (0xA | (3 << 4), 0x9 | (2 << 4)));
    }
}
