//! Every case of `../shared/vectors/quant-blocks.json` (made by ggml itself): our dequantizers reproduce
//! ggml's `to_float` bit for bit, and our reference quantizers reproduce `quantize_row_*_ref` byte for byte.

mod support;

use cyber_inference::engine::ggml_type::GgmlType;
use cyber_inference::engine::kernels;
use cyber_inference::engine::quant;
use serde::Deserialize;
use std::collections::BTreeMap;
use support::assets::shared_vector_json;

#[derive(Deserialize)]
struct File {
    types: BTreeMap<String, TypeCases>,
}

#[derive(Deserialize)]
struct TypeCases {
    type_id: u32,
    block_size: usize,
    type_size: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    n: usize,
    input: Vec<f64>,
    quantized_hex: String,
    dequantized: Vec<f64>,
}

fn load() -> File {
    serde_json::from_value(shared_vector_json("quant-blocks.json"))
        .expect("quant-blocks.json has the fields of `File`")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Types whose dequantizer must be bit-exact (issue 4).
const DEQUANT_REQUIRED: [&str; 15] = [
    "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS", "MXFP4",
];
/// Types whose reference quantizer must be byte-identical.
const QUANT_REQUIRED: [&str; 5] = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"];

#[test]
fn dequantizers_are_bit_exact_with_ggml() {
    let file = load();
    let mut checked = Vec::new();
    for (name, tc) in &file.types {
        let ty = GgmlType::from_name(name).unwrap_or_else(|| panic!("unknown type {name}"));
        assert_eq!(ty.id(), tc.type_id, "{name} id");
        assert_eq!(ty.block_size(), tc.block_size, "{name} block size");
        assert_eq!(ty.type_size(), tc.type_size, "{name} type size");
        if !quant::can_dequantize(ty) {
            continue;
        }
        for c in &tc.cases {
            let q = hex(&c.quantized_hex);
            let mut out = vec![0f32; c.n];
            quant::dequantize_row(ty, &q, &mut out)
                .unwrap_or_else(|e| panic!("{name}/{}: {e}", c.name));
            for (i, (got, want)) in out.iter().zip(&c.dequantized).enumerate() {
                let want = *want as f32;
                assert!(
                    got.to_bits() == want.to_bits(),
                    "{name}/{} element {i}: got {got:e}, ggml {want:e}",
                    c.name
                );
            }
        }
        checked.push(name.clone());
    }
    for req in DEQUANT_REQUIRED {
        assert!(checked.iter().any(|c| c == req), "{req} not checked");
    }
    eprintln!("dequantizers checked bit-exact: {checked:?}");
}

#[test]
fn reference_quantizers_are_byte_identical_with_ggml() {
    let file = load();
    let mut checked = Vec::new();
    for (name, tc) in &file.types {
        let ty = GgmlType::from_name(name).expect("known type");
        if !quant::can_quantize(ty) {
            continue;
        }
        for c in &tc.cases {
            let x: Vec<f32> = c.input.iter().map(|v| *v as f32).collect();
            let mut q = vec![0u8; quant::row_bytes(ty, c.n).unwrap()];
            quant::quantize_row(ty, &x, &mut q).unwrap();
            let want = hex(&c.quantized_hex);
            if q != want {
                let first = q.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                panic!(
                    "{name}/{}: first differing byte {first}: ours {:02x?}, ggml {:02x?}",
                    c.name,
                    &q[first..(first + 8).min(q.len())],
                    &want[first..(first + 8).min(want.len())]
                );
            }
        }
        checked.push(name.clone());
    }
    for req in QUANT_REQUIRED {
        assert!(checked.iter().any(|c| c == req), "{req} not checked");
    }
    eprintln!("quantizers checked byte-identical: {checked:?}");
}

/// The dot product of each ggml-quantized row with activations equals, within the activation quantization
/// error, the dot product of ggml's dequantized row with the f32 activations — for the scalar oracle and
/// the dispatched (SIMD) kernel.
#[test]
fn vec_dot_of_ggml_blocks_matches_dequantized_dot() {
    let file = load();
    let mut checked = Vec::new();
    for (name, tc) in &file.types {
        let ty = GgmlType::from_name(name).expect("known type");
        let Some(vd) = quant::vec_dot_type(ty) else {
            continue;
        };
        for c in &tc.cases {
            let w = hex(&c.quantized_hex);
            let wf: Vec<f32> = c.dequantized.iter().map(|v| *v as f32).collect();
            // Activations: a fixed pseudo-random pattern in [-1, 1].
            let x: Vec<f32> = (0..c.n)
                .map(|i| (((i * 7919 + 13) % 255) as f32 / 127.0) - 1.0)
                .collect();
            let mut a = vec![0u8; quant::row_bytes(vd, c.n).unwrap()];
            quant::quantize_row(vd, &x, &mut a).unwrap();
            let mut xa = vec![0f32; c.n];
            quant::dequantize_row(vd, &a, &mut xa).unwrap();
            // Exact dot of the two dequantized rows, in f64.
            let exact: f64 = wf.iter().zip(&xa).map(|(p, q)| *p as f64 * *q as f64).sum();
            let scale: f64 = wf
                .iter()
                .zip(&xa)
                .map(|(p, q)| (*p as f64 * *q as f64).abs())
                .sum();
            // Q8_1 stores s = d·Σq as f16, so the min term of Q4_1/Q5_1 carries a relative 2^-11 error.
            let rel = if vd == GgmlType::Q8_1 { 1e-3 } else { 1e-5 };
            let tol = rel * scale + 1e-30;
            let s = kernels::vec_dot_scalar(ty, c.n, &w, &a).unwrap() as f64;
            let v = kernels::vec_dot(ty, c.n, &w, &a).unwrap() as f64;
            let finite = wf.iter().all(|v| v.is_finite());
            if finite {
                assert!(
                    (s - exact).abs() <= tol,
                    "{name}/{} scalar {s} vs {exact}",
                    c.name
                );
                assert!(
                    (v - exact).abs() <= tol,
                    "{name}/{} simd {v} vs {exact}",
                    c.name
                );
            }
        }
        checked.push(name.clone());
    }
    eprintln!("vec_dot checked: {checked:?}");
    assert!(checked.len() >= 14, "{checked:?}");
}
