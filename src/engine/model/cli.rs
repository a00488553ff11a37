//! The `run`, `perplexity` and `embed` subcommands: the engine from the command line, like llama.cpp's tools.
