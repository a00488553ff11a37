//! Batch invariance on the synthetic models of `scripts/synth-models` (the architectures without a small
//! real file, MoE included): a token's logits are bit-identical whether computed in one batch, in batches
//! of 7, token by token, or interleaved with another sequence, at 1 and 2 threads. For the MoE models this
//! is the check that per-expert batches (tokens grouped by the expert they are routed to) do not change
//! any token's float order.

mod support;

use support::model::check_decoder;
use support::synth::load;

const N: usize = 48;

fn check(name: &str) {
    check_decoder(&load(name), name, N);
}

#[test]
fn mixtral_logits_are_batch_invariant() {
    check("synth-mixtral");
}

#[test]
fn qwen2moe_logits_are_batch_invariant() {
    check("synth-qwen2moe");
}

#[test]
fn qwen3moe_logits_are_batch_invariant() {
    check("synth-qwen3moe");
}

#[test]
fn phi3_logits_are_batch_invariant() {
    check("synth-phi3");
}

#[test]
fn qwen2_logits_are_batch_invariant() {
    check("synth-qwen2");
}

#[test]
fn qwen3_logits_are_batch_invariant() {
    check("synth-qwen3");
}

#[test]
fn llama3_logits_are_batch_invariant() {
    check("synth-llama3");
}
