//! Chat templates (Jinja via minijinja) from GGUF metadata, rendered as llama.cpp renders them.
