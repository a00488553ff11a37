//! Tokenizers built from GGUF metadata (SPM, BPE, WPM), identical to llama.cpp.
