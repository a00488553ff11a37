//! Model hyper-parameters, weights and forward passes (llama, qwen2, qwen3, bert), and the KV cache.
