//! x86-64 SIMD kernels (AVX2 + FMA + F16C), each the twin of a function in [`super::scalar`].

use crate::engine::ggml_type::GgmlType;

use super::dispatch::VecDotFn;

/// Whether this CPU has everything these kernels use.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The AVX2 kernel for `ty`, where one exists.
pub fn vec_dot_fn(_ty: GgmlType) -> Option<VecDotFn> {
    None
}
