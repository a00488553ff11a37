//! The worker: an OpenAI-compatible HTTP server around one engine, with slots and continuous batching.
