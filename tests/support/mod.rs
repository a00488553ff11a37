//! The one support module of the end-to-end tests: every `tests/*.rs` declares `mod support;` and takes
//! what it needs from the submodules below, so each helper (asset paths, free ports, spawning the binary,
//! waiting for health, the Python lookup, the fake hub…) is written once.
#![allow(dead_code)]

pub mod assets;
pub mod files;
pub mod gpu;
pub mod hub;
pub mod model;
pub mod net;
pub mod process;
pub mod python;
pub mod server;
pub mod synth;
pub mod ui;
pub mod worker;
