//! Hostile GGUF input: the shared model files cut at many lengths and with random bytes flipped in their
//! header and tensor-info region. Every case must give an error or a consistent file, never a panic, and
//! the parse must never allocate more than the file's size (measured by a counting allocator).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::OnceLock;

use cyber_inference::engine::gguf::{GgufFile, Value};
use proptest::prelude::*;
use support::assets::{MODELS, model};

/// Counts the bytes allocated and live on the current thread, and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only updates thread-local counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|l| {
            l.set(l.get() + layout.size());
            let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
        });
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(layout.size())));
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes an error message or an empty file's bookkeeping may take beyond the file size.
const SLACK: usize = 4096;

/// Parses `image` and returns the peak bytes allocated by the parse (not counting `image` itself).
fn parse_measured(image: Vec<u8>) -> (Result<GgufFile, String>, usize) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let r = GgufFile::from_bytes(image).map_err(|e| e.to_string());
    let peak = PEAK.with(|p| p.get()) - base;
    (r, peak)
}

/// Touches everything a parsed file exposes: it must all be readable without a panic.
fn check_consistent(f: &GgufFile) {
    for (_, v) in f.metadata() {
        if let Value::Array(a) = v {
            assert_eq!(a.iter().count(), a.len());
        }
        let _ = v.to_string();
    }
    for t in f.tensors() {
        assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
        assert!(f.data_offset + t.offset + t.n_bytes <= f.file_size());
    }
}

fn files() -> &'static Vec<(String, Vec<u8>, usize)> {
    static FILES: OnceLock<Vec<(String, Vec<u8>, usize)>> = OnceLock::new();
    FILES.get_or_init(|| {
        MODELS
            .iter()
            .map(|name| {
                let bytes = std::fs::read(model(name)).unwrap();
                let data_offset = GgufFile::open(model(name)).unwrap().data_offset as usize;
                (name.to_string(), bytes, data_offset)
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    /// Cut within the header and tensor infos (most cases) or anywhere in the file.
    #[test]
    fn truncated_files_fail_cleanly(which in 0usize..3, frac in 0.0f64..1.0, anywhere in proptest::bool::weighted(0.1)) {
        let (name, bytes, data_offset) = &files()[which];
        let limit = if anywhere { bytes.len() } else { data_offset + 64 };
        let cut = ((limit as f64) * frac) as usize;
        let (r, peak) = parse_measured(bytes[..cut].to_vec());
        match r {
            Ok(f) => check_consistent(&f),
            Err(e) => prop_assert!(!e.is_empty()),
        }
        prop_assert!(peak <= cut + SLACK, "{name} cut at {cut}: parse allocated {peak} bytes");
    }

    /// Flip 1..8 random bytes among the header and tensor-info bytes.
    #[test]
    fn flipped_headers_fail_cleanly_or_parse_consistently(
        which in 0usize..3,
        flips in proptest::collection::vec((0.0f64..1.0, 1u8..=255), 1..8),
        truncate_data in proptest::bool::ANY,
    ) {
        let (name, bytes, data_offset) = &files()[which];
        // Keep the data section whole in half of the cases, so flips can yield a valid file.
        let len = if truncate_data { data_offset + 64 } else { bytes.len() };
        let mut image = bytes[..len].to_vec();
        for (pos, xor) in &flips {
            let i = ((*data_offset as f64) * pos) as usize;
            image[i] ^= xor;
        }
        let (r, peak) = parse_measured(image);
        match r {
            Ok(f) => check_consistent(&f),
            Err(e) => prop_assert!(!e.is_empty()),
        }
        prop_assert!(peak <= len + SLACK, "{name}: parse allocated {peak} bytes for a {len}-byte file");
    }
}

/// The counting allocator really sees the parse: a whole file's metadata takes memory, bounded by its size.
#[test]
fn measurement_sees_the_parse() {
    let (name, bytes, _) = &files()[2];
    let (r, peak) = parse_measured(bytes.clone());
    let f = r.unwrap();
    let vocab = f.get_str_array("tokenizer.ggml.tokens").unwrap().len();
    assert!(
        peak >= vocab * 8,
        "{name}: only {peak} bytes measured for {vocab} token offsets"
    );
    assert!(peak <= bytes.len(), "{name}: {peak} bytes");
}
