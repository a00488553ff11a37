//! Samplers in llama.cpp's order with a seeded RNG.
