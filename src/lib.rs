//! cyber-inference: a local LLM server for one machine — a supervisor of GGUF model workers and its own
//! inference engine. See `DESIGN.md` (shared) for the layers; imports point down only:
//! `main → supervisor | worker → engine`, all may use `openai` and `http_server` (the HTTP server loop both run).

pub mod config;
pub mod engine;
pub mod http_server;
pub mod openai;
pub mod supervisor;
pub mod worker;
