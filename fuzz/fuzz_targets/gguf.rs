//! Fuzz target: arbitrary bytes through the GGUF reader must give an error or a consistent file.
#![no_main]

use cyber_inference::engine::gguf::{GgufFile, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = GgufFile::from_bytes(data.to_vec()) {
        for (_, v) in f.metadata() {
            if let Value::Array(a) = v {
                assert_eq!(a.iter().count(), a.len());
            }
        }
        for t in f.tensors() {
            assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
        }
    }
});
