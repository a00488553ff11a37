//! The inference engine: synchronous compute over GGUF files, with no async runtime, HTTP or SQL.

pub mod chat;
pub mod constraint;
pub mod ggml_type;
pub mod gguf;
pub mod gguf_split;
pub mod gpu;
pub mod inspect;
pub mod kernels;
pub mod kv_layout;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod tokenizer;
