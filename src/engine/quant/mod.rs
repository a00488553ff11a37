//! ggml block formats: layouts, dequantization, reference quantizers, activation quantization.
