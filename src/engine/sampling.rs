//! Samplers in llama.cpp's order with a seeded RNG: the step that turns a row of logits into the next token.
//!
//! Order and maths follow llama.cpp commit 0c1e570, `common/sampling.cpp` (the default chain: logit bias,
//! penalties, top-k, typical, top-p, min-p, temperature, then the seeded draw) and `src/llama-sampling.cpp`
//! (`llama_sampler_penalties_apply`, `_top_k_impl`, `_typical_apply`, `_top_p_apply`, `_min_p_apply`,
//! `_temp_impl`). A temperature ≤ 0 is greedy: the highest logit after bias and penalties.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampler settings. [`Default`] gives llama.cpp's defaults (`common_params_sampling`).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerParams {
    /// Softmax temperature; ≤ 0 selects the argmax (greedy). Default 0.8.
    pub temperature: f32,
    /// Keep the `top_k` best candidates; ≤ 0 keeps all. Default 40.
    pub top_k: i32,
    /// Nucleus: keep the smallest set whose probability reaches `top_p`; 1.0 disables. Default 0.95.
    pub top_p: f32,
    /// Drop candidates with probability below `min_p` × the best one's; 0 disables. Default 0.05.
    pub min_p: f32,
    /// Locally typical sampling mass; 1.0 disables. Default 1.0.
    pub typical_p: f32,
    /// Repetition penalty (divides positive logits, multiplies negative ones); 1.0 disables.
    pub repeat_penalty: f32,
    /// Window of past tokens the penalties look at; 0 disables, -1 means the whole history. Default 64.
    pub repeat_last_n: i32,
    /// Subtracted once from the logit of any token present in the window. Default 0.
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the window. Default 0.
    pub frequency_penalty: f32,
    /// RNG seed; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Added to a token's logit before anything else (`-inf` bans it).
    pub logit_bias: Vec<(u32, f32)>,
    /// The samplers and their order (llama-server's `samplers`); [`DEFAULT_CHAIN`] by default. A stage
    /// left out does not run; the draw always comes last.
    pub chain: Vec<Stage>,
}

/// One stage of the sampler chain, by llama.cpp's name (`common_sampler_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Repetition, presence and frequency penalties (`penalties`).
    Penalties,
    /// Top-k (`top_k`).
    TopK,
    /// Locally typical sampling (`typ_p`).
    Typical,
    /// Nucleus (`top_p`).
    TopP,
    /// Min-p (`min_p`).
    MinP,
    /// Temperature (`temperature`).
    Temperature,
}

/// llama.cpp's default chain, less the stages that do nothing at their defaults and that this engine
/// does not implement (`dry`, `top_n_sigma`, `xtc`).
pub const DEFAULT_CHAIN: [Stage; 6] = [
    Stage::Penalties,
    Stage::TopK,
    Stage::Typical,
    Stage::TopP,
    Stage::MinP,
    Stage::Temperature,
];

/// llama.cpp's names of the stages this engine runs and of the default-chain stages it accepts as
/// no-ops (they do nothing unless their own parameters, which requests cannot set here, are set).
const STAGE_NAMES: [(&str, Option<Stage>); 13] = [
    ("penalties", Some(Stage::Penalties)),
    ("top_k", Some(Stage::TopK)),
    ("typ_p", Some(Stage::Typical)),
    ("typical_p", Some(Stage::Typical)),
    ("typical", Some(Stage::Typical)),
    ("top_p", Some(Stage::TopP)),
    ("nucleus", Some(Stage::TopP)),
    ("min_p", Some(Stage::MinP)),
    ("temperature", Some(Stage::Temperature)),
    ("temp", Some(Stage::Temperature)),
    ("dry", None),
    ("top_n_sigma", None),
    ("xtc", None),
];

/// llama.cpp's one-letter codes (`common_sampler_type_to_chr`) for the string form of `samplers`.
const STAGE_CHARS: [(char, Option<Stage>); 9] = [
    ('e', Some(Stage::Penalties)),
    ('k', Some(Stage::TopK)),
    ('y', Some(Stage::Typical)),
    ('p', Some(Stage::TopP)),
    ('m', Some(Stage::MinP)),
    ('t', Some(Stage::Temperature)),
    ('d', None),
    ('s', None),
    ('x', None),
];

impl Stage {
    /// llama.cpp's name of the stage (as `/props` and `generation_settings.samplers` show it).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Penalties => "penalties",
            Stage::TopK => "top_k",
            Stage::Typical => "typ_p",
            Stage::TopP => "top_p",
            Stage::MinP => "min_p",
            Stage::Temperature => "temperature",
        }
    }

    /// The chain named by `names` (llama-server's array form of `samplers`).
    ///
    /// Errors: a name that is not a sampler, or one this engine does not have (mirostat, infill, ...).
    pub fn chain_from_names<S: AsRef<str>>(names: &[S]) -> Result<Vec<Stage>, String> {
        let mut out = Vec::new();
        for n in names {
            let n = n.as_ref();
            match STAGE_NAMES.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)) {
                Some((_, Some(s))) => out.push(*s),
                Some((_, None)) => {}
                None => {
                    return Err(format!(
                        "unknown sampler '{n}' (known: {})",
                        STAGE_NAMES.map(|(k, _)| k).join(", ")
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The chain given as one-letter codes (llama-server's string form of `samplers`, e.g. `"kfypmt"`).
    ///
    /// Errors: a letter that is not a sampler code this engine has.
    pub fn chain_from_chars(codes: &str) -> Result<Vec<Stage>, String> {
        let mut out = Vec::new();
        for c in codes.chars() {
            match STAGE_CHARS.iter().find(|(k, _)| *k == c) {
                Some((_, Some(s))) => out.push(*s),
                Some((_, None)) => {}
                None => return Err(format!("unknown sampler code '{c}'")),
            }
        }
        Ok(out)
    }
}

impl Default for SamplerParams {
    fn default() -> Self {
        SamplerParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            typical_p: 1.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
            chain: DEFAULT_CHAIN.to_vec(),
        }
    }
}

impl SamplerParams {
    /// Greedy decoding (temperature 0, no penalties).
    pub fn greedy() -> Self {
        SamplerParams {
            temperature: 0.0,
            ..Default::default()
        }
    }
}

/// A candidate token during sampling.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cand {
    id: u32,
    logit: f32,
    p: f32,
}

/// A sampler: the chain of [`SamplerParams`] and its RNG state (same seed → same tokens).
pub struct Sampler {
    params: SamplerParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler with its RNG seeded from `params.seed` (or the OS when `None`).
    pub fn new(params: SamplerParams) -> Sampler {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    /// The settings.
    pub fn params(&self) -> &SamplerParams {
        &self.params
    }

    /// Picks the next token from `logits` (`[n_vocab]`, raw) given the tokens generated or read so far
    /// (`history`, oldest first; the penalties look at its last `repeat_last_n`). Returns a token id
    /// `< logits.len()`; for empty `logits`, 0.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.sample_with_probs(logits, history, 0).0
    }

    /// [`Sampler::sample`], also returning the chosen token's probability after the chain and the `n`
    /// most likely candidates left after it with their probabilities (llama-server's
    /// `post_sampling_probs`), best first; candidates of probability 0 are left out. A greedy draw
    /// (temperature ≤ 0) leaves one candidate, the chosen token, with probability 1.
    pub fn sample_with_probs(
        &mut self,
        logits: &[f32],
        history: &[u32],
        n: usize,
    ) -> (u32, f32, Vec<(u32, f32)>) {
        let p = &self.params;
        let mut cands: Vec<Cand> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| Cand {
                id: i as u32,
                logit: l,
                p: 0.0,
            })
            .collect();
        if cands.is_empty() {
            return (0, 0.0, Vec::new());
        }
        // 1. logit bias
        for &(id, bias) in &p.logit_bias {
            if let Some(c) = cands.get_mut(id as usize) {
                c.logit += bias;
            }
        }
        // Greedy: argmax after bias and penalties (the first of equal maxima, as llama_sampler_greedy).
        if p.temperature <= 0.0 {
            if p.chain.contains(&Stage::Penalties) {
                apply_penalties(&mut cands, history, p);
            }
            let id = argmax_cands(&cands);
            return (id, 1.0, if n > 0 { vec![(id, 1.0)] } else { Vec::new() });
        }
        // 2. the chain, in the requested order
        let mut temperature_done = false;
        for stage in &p.chain {
            match stage {
                Stage::Penalties => apply_penalties(&mut cands, history, p),
                Stage::TopK => top_k(&mut cands, p.top_k),
                Stage::Typical if p.typical_p < 1.0 => {
                    sort_desc(&mut cands);
                    typical(&mut cands, p.typical_p);
                }
                Stage::TopP if p.top_p < 1.0 => {
                    sort_desc(&mut cands);
                    top_p(&mut cands, p.top_p);
                }
                Stage::MinP if p.min_p > 0.0 => min_p(&mut cands, p.min_p),
                Stage::Temperature if !temperature_done => {
                    temperature_done = true;
                    for c in cands.iter_mut() {
                        c.logit /= p.temperature;
                    }
                }
                _ => {}
            }
        }
        // 3. the seeded draw
        softmax_cands(&mut cands);
        let r: f64 = self.rng.random::<f64>();
        let mut acc = 0.0f64;
        let mut chosen = cands.last().map_or((0, 0.0), |c| (c.id, c.p));
        for c in &cands {
            acc += c.p as f64;
            if r < acc {
                chosen = (c.id, c.p);
                break;
            }
        }
        let mut top = Vec::new();
        if n > 0 {
            let mut sorted: Vec<Cand> = cands.into_iter().filter(|c| c.p > 0.0).collect();
            sorted.sort_by(|a, b| b.p.total_cmp(&a.p).then(a.id.cmp(&b.id)));
            top = sorted.into_iter().take(n).map(|c| (c.id, c.p)).collect();
        }
        (chosen.0, chosen.1, top)
    }
}

/// Sorts by logit descending, ties by lower id (a no-op on candidates top-k already sorted).
fn sort_desc(cands: &mut [Cand]) {
    if !cands
        .windows(2)
        .all(|w| w[0].logit > w[1].logit || (w[0].logit == w[1].logit && w[0].id < w[1].id))
    {
        cands.sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id)));
    }
}

/// `llama_sampler_penalties_apply`: for each token with count `c > 0` in the window, divide a positive logit
/// (multiply a non-positive one) by `repeat_penalty`, then subtract `c·frequency + presence`.
fn apply_penalties(cands: &mut [Cand], history: &[u32], p: &SamplerParams) {
    let inactive = p.repeat_last_n == 0
        || (p.repeat_penalty == 1.0 && p.frequency_penalty == 0.0 && p.presence_penalty == 0.0);
    if inactive || history.is_empty() {
        return;
    }
    let n = if p.repeat_last_n < 0 {
        history.len()
    } else {
        (p.repeat_last_n as usize).min(history.len())
    };
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for &t in &history[history.len() - n..] {
        *counts.entry(t).or_insert(0) += 1;
    }
    for (&id, &count) in &counts {
        if let Some(c) = cands.get_mut(id as usize) {
            if c.logit <= 0.0 {
                c.logit *= p.repeat_penalty;
            } else {
                c.logit /= p.repeat_penalty;
            }
            c.logit -= count as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }
}

fn argmax_cands(cands: &[Cand]) -> u32 {
    let mut best = 0;
    for (i, c) in cands.iter().enumerate() {
        if c.logit > cands[best].logit {
            best = i;
        }
    }
    cands[best].id
}

/// Sorts by logit descending (ties: lower id first) and keeps `k` (all when `k ≤ 0`).
fn top_k(cands: &mut Vec<Cand>, k: i32) {
    cands.sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id)));
    if k > 0 {
        cands.truncate((k as usize).max(1));
    }
}

/// Softmax over the candidates' logits into `p` (sum in f64).
fn softmax_cands(cands: &mut [Cand]) {
    let max = cands
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for c in cands.iter_mut() {
        c.p = (c.logit - max).exp();
        sum += c.p as f64;
    }
    for c in cands.iter_mut() {
        c.p = (c.p as f64 / sum) as f32;
    }
}

/// `llama_sampler_top_p_apply`: on sorted candidates, keep the prefix whose cumulative probability first
/// reaches `p` (at least one).
fn top_p(cands: &mut Vec<Cand>, p: f32) {
    softmax_cands(cands);
    let mut cum = 0.0f32;
    let mut keep = cands.len();
    for (i, c) in cands.iter().enumerate() {
        cum += c.p;
        if cum >= p {
            keep = i + 1;
            break;
        }
    }
    cands.truncate(keep.max(1));
}

/// `llama_sampler_min_p_apply`: keep candidates whose logit ≥ max logit + ln(p) (i.e. probability ≥ p·max).
fn min_p(cands: &mut Vec<Cand>, p: f32) {
    let max = cands
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    let min_logit = max + p.ln();
    let kept: Vec<Cand> = cands
        .iter()
        .copied()
        .filter(|c| c.logit >= min_logit)
        .collect();
    if !kept.is_empty() {
        *cands = kept;
    }
}

/// `llama_sampler_typical_apply`: keep the tokens whose surprise is closest to the entropy until their mass
/// reaches `p`.
fn typical(cands: &mut Vec<Cand>, p: f32) {
    softmax_cands(cands);
    let entropy: f32 = -cands
        .iter()
        .filter(|c| c.p > 0.0)
        .map(|c| c.p * c.p.ln())
        .sum::<f32>();
    let mut scored: Vec<(f32, Cand)> = cands
        .iter()
        .map(|c| ((-c.p.ln() - entropy).abs(), *c))
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut cum = 0.0f32;
    let mut keep = scored.len();
    for (i, (_, c)) in scored.iter().enumerate() {
        cum += c.p;
        if cum > p {
            keep = i + 1;
            break;
        }
    }
    *cands = scored
        .into_iter()
        .take(keep.max(1))
        .map(|(_, c)| c)
        .collect();
}

/// Sets the logit of every token that `allowed` does not allow to `-inf`, before the samplers run: the
/// grammar step of llama.cpp's `llama_sampler_llg_apply` (common/llguidance.cpp, commit 0c1e570).
/// `allowed` is a bitset, bit `t % 32` of word `t / 32` set when token `t` is allowed; logits past its
/// end (a model whose output row is wider than its vocabulary) are disallowed too.
pub fn mask_logits(logits: &mut [f32], allowed: &[u32]) {
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = allowed.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (b, l) in chunk.iter_mut().enumerate() {
            if bits & (1 << b) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Natural-log softmax over the full row: `logits[i] - max - ln Σ exp(logits - max)` (sum in f64).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = sum.ln() as f32;
    logits.iter().map(|&l| l - max - lse).collect()
}

/// The `n` most likely tokens with their natural-log probabilities over the full vocabulary, best first
/// (ties: lower id first).
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let lp = log_softmax(logits);
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let n = n.min(idx.len());
    let cmp = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    if n < idx.len() && n > 0 {
        idx.select_nth_unstable_by(n - 1, cmp);
    }
    idx.truncate(n);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, lp[i as usize])).collect()
}

/// Index of the largest logit (the first of equal maxima); 0 for an empty row.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.0, 2.9]
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerParams::greedy());
        assert_eq!(s.sample(&logits(), &[]), 1);
        assert_eq!(argmax(&logits()), 1);
        assert_eq!(argmax(&[2.0, 2.0]), 0, "first of equal maxima");
    }

    #[test]
    fn logit_bias_applies_first() {
        let mut p = SamplerParams::greedy();
        p.logit_bias = vec![(1, f32::NEG_INFINITY), (3, 10.0)];
        assert_eq!(Sampler::new(p).sample(&logits(), &[]), 3);
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative() {
        let p = SamplerParams {
            repeat_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..SamplerParams::greedy()
        };
        let mut c: Vec<Cand> = [4.0f32, -1.0, 1.0]
            .iter()
            .enumerate()
            .map(|(i, &l)| Cand {
                id: i as u32,
                logit: l,
                p: 0.0,
            })
            .collect();
        apply_penalties(&mut c, &[0, 0, 1, 2, 2, 2], &p);
        assert_eq!(c[0].logit, 4.0 / 2.0 - (2.0 * 0.5 + 0.25));
        assert_eq!(c[1].logit, -2.0 - (0.5 + 0.25));
        assert_eq!(c[2].logit, 1.0 / 2.0 - (3.0 * 0.5 + 0.25));
        // The window: only the last 1 token (2) counts.
        let p1 = SamplerParams {
            repeat_last_n: 1,
            ..p
        };
        let mut d: Vec<Cand> = c.iter().map(|x| Cand { logit: 4.0, ..*x }).collect();
        apply_penalties(&mut d, &[0, 0, 1, 2], &p1);
        assert_eq!(d[0].logit, 4.0);
        assert_eq!(d[2].logit, 2.0 - 0.75);
        // Greedy changes its choice when the best token is penalised.
        let mut s = Sampler::new(SamplerParams {
            repeat_penalty: 1.5,
            ..SamplerParams::greedy()
        });
        assert_eq!(s.sample(&logits(), &[1]), 5);
    }

    #[test]
    fn top_k_one_is_deterministic() {
        let mut s = Sampler::new(SamplerParams {
            top_k: 1,
            seed: Some(7),
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits(), &[]), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_filter() {
        let mut c: Vec<Cand> = logits()
            .iter()
            .enumerate()
            .map(|(i, &l)| Cand {
                id: i as u32,
                logit: l,
                p: 0.0,
            })
            .collect();
        top_k(&mut c, 0);
        assert_eq!(
            c.iter().map(|x| x.id).collect::<Vec<_>>(),
            vec![1, 5, 2, 0, 4, 3]
        );
        let mut tp = c.clone();
        top_p(&mut tp, 0.5);
        // p(1) ≈ 0.36, p(5) ≈ 0.33: two are needed to reach 0.5.
        assert_eq!(tp.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1, 5]);
        let mut mp = c.clone();
        min_p(&mut mp, 0.5);
        // Keeps logits ≥ 3 + ln 0.5 ≈ 2.307.
        assert_eq!(mp.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1, 5, 2]);
    }

    #[test]
    fn seeded_draws_repeat_and_follow_probabilities() {
        let params = SamplerParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(42),
            ..Default::default()
        };
        let l = vec![0.0f32, (3.0f32).ln()]; // probabilities 0.25 / 0.75
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..4000).map(|_| s.sample(&l, &[])).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..4000).map(|_| s.sample(&l, &[])).collect()
        };
        assert_eq!(a, b, "same seed, same tokens");
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "frequency {ones}");
        let c: Vec<u32> = {
            let mut s = Sampler::new(SamplerParams {
                seed: Some(43),
                ..params
            });
            (0..4000).map(|_| s.sample(&l, &[])).collect()
        };
        assert_ne!(a, c, "another seed, another sequence");
    }

    #[test]
    fn high_temperature_flattens_low_sharpens() {
        let l = vec![0.0f32, 1.0];
        let count = |t: f32| {
            let mut s = Sampler::new(SamplerParams {
                temperature: t,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                seed: Some(1),
                ..Default::default()
            });
            (0..2000).filter(|_| s.sample(&l, &[]) == 1).count()
        };
        assert!(count(0.1) > 1990);
        let hot = count(100.0);
        assert!((900..1100).contains(&hot), "{hot}");
    }

    #[test]
    fn typical_keeps_mass() {
        let mut c: Vec<Cand> = logits()
            .iter()
            .enumerate()
            .map(|(i, &l)| Cand {
                id: i as u32,
                logit: l,
                p: 0.0,
            })
            .collect();
        typical(&mut c, 0.5);
        assert!(!c.is_empty() && c.len() < 6);
        let mass: f32 = c.iter().map(|x| x.p).sum();
        assert!(mass > 0.5);
    }

    #[test]
    fn mask_logits_bans_disallowed_and_out_of_mask_tokens() {
        let mut l: Vec<f32> = (0..40).map(|i| i as f32).collect();
        // Allowed: 1, 31, 33; the mask has two words, the row 40 logits.
        mask_logits(&mut l, &[(1 << 1) | (1 << 31), 1 << 1]);
        for (i, &x) in l.iter().enumerate() {
            if [1, 31, 33].contains(&i) {
                assert_eq!(x, i as f32);
            } else {
                assert_eq!(x, f32::NEG_INFINITY, "token {i}");
            }
        }
        let mut s = Sampler::new(SamplerParams::default());
        assert!([1, 31, 33].contains(&s.sample(&l, &[])));
        assert_eq!(Sampler::new(SamplerParams::greedy()).sample(&l, &[]), 33);
        let mut short = vec![0.5f32; 3];
        mask_logits(&mut short, &[]);
        assert!(short.iter().all(|x| *x == f32::NEG_INFINITY));
    }

    #[test]
    fn log_softmax_and_top_logprobs() {
        let l = logits();
        let lp = log_softmax(&l);
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let top = top_logprobs(&l, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 5, 2]);
        assert_eq!(top[0].1, lp[1]);
        assert_eq!(top_logprobs(&l, 100).len(), 6);
        assert!(top_logprobs(&l, 0).is_empty());
    }
}
