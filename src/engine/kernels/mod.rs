//! The compute kernels: the only SIMD and `unsafe` of the engine, each with a scalar twin.

pub mod ops;
