//! A deterministic test double of the engine (tests only): a byte-level "model" whose next token depends
//! on the whole sequence, and a context that checks every batch as strictly as the real one must (positions
//! contiguous per sequence, inside the context). It lets the scheduler and the HTTP layer be tested for
//! batching, cancellation, stop strings and error handling without loading a GGUF model.

use std::sync::{Arc, Mutex};

use crate::engine::constraint::{GrammarCompiler, TokenizeFn};

use super::backend::{
    BackendError, BatchPlan, Codec, Compute, ModelInfo, SamplingParams, TokenSampler,
};

/// End-of-generation token id.
pub const EOG: u32 = 256;
/// Beginning-of-sequence token id.
pub const BOS: u32 = 257;
const N_VOCAB: usize = 258;

/// The fake model's greedy next token after `seq` (all tokens so far, BOS first).
pub fn next_token(seq: &[u32]) -> u32 {
    if let Some(p) = seq.iter().rposition(|&t| t == u32::from(b'!'))
        && seq.len() - p - 1 == 4
    {
        return EOG;
    }
    let h: u64 = seq
        .iter()
        .enumerate()
        .map(|(i, &t)| u64::from(t) * (i as u64 + 1))
        .sum();
    u32::from(b'a') + (h % 26) as u32
}

/// Byte-level codec: token = byte, plus EOG and BOS; its grammar compiler is llguidance over those
/// tokens (EOG and BOS special).
#[derive(Debug)]
pub struct FakeCodec {
    info: ModelInfo,
    grammar: GrammarCompiler,
    /// `(bytes, delay)`: encoding a text, or rendering a chat, of at least `bytes` sleeps `delay` on
    /// the calling thread (a stand-in for a real tokenizer's cost on a huge prompt).
    slow: Option<(usize, std::time::Duration)>,
    /// Slow encodes or renderings running now.
    slow_running: std::sync::atomic::AtomicUsize,
}

impl Default for FakeCodec {
    fn default() -> Self {
        FakeCodec {
            info: ModelInfo {
                arch: "fake".into(),
                n_vocab: N_VOCAB,
                n_embd: 4,
                n_ctx_train: 4096,
                is_encoder: false,
                chat_template: Some("{{ fake }}".into()),
                eog_tokens: vec![EOG],
                add_bos: Some(BOS),
                ..ModelInfo::default()
            },
            grammar: fake_grammar(),
            slow: None,
            slow_running: Default::default(),
        }
    }
}

impl FakeCodec {
    /// A fake whose encoding of a text, and rendering of a chat, of at least `bytes` bytes blocks its
    /// thread for `delay`.
    pub fn with_slow_work(mut self, bytes: usize, delay: std::time::Duration) -> FakeCodec {
        self.slow = Some((bytes, delay));
        self
    }

    /// How many slow encodes or renderings ([`FakeCodec::with_slow_work`]) are running now.
    pub fn slow_running(&self) -> usize {
        self.slow_running.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn maybe_slow(&self, bytes: usize) {
        if let Some((min, delay)) = self.slow
            && bytes >= min
        {
            use std::sync::atomic::Ordering::SeqCst;
            self.slow_running.fetch_add(1, SeqCst);
            std::thread::sleep(delay);
            self.slow_running.fetch_sub(1, SeqCst);
        }
    }

    /// A fake whose vocabulary has these fill-in-the-middle tokens (byte ids).
    pub fn with_fim(fim: super::backend::FimTokens) -> FakeCodec {
        let mut c = FakeCodec::default();
        c.info.fim = fim;
        c
    }
}

fn fake_grammar() -> GrammarCompiler {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    tokens.push(b"\xff</s>".to_vec());
    tokens.push(b"\xff<s>".to_vec());
    let tokenize: TokenizeFn = Arc::new(|s: &str| s.bytes().map(u32::from).collect());
    GrammarCompiler::new(tokens, &[EOG], tokenize).expect("the fake vocabulary is valid")
}

impl FakeCodec {
    /// The greedy continuation of `prompt` (tokenized with BOS), at most `n` tokens, as text.
    pub fn expected(&self, prompt: &str, n: usize) -> String {
        let mut seq = self.encode(prompt, true, false);
        let mut out = Vec::new();
        for _ in 0..n {
            let t = next_token(&seq);
            if t == EOG {
                break;
            }
            seq.push(t);
            out.push(t as u8);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Codec for FakeCodec {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn encode(&self, text: &str, add_special: bool, _parse_special: bool) -> Vec<u32> {
        self.maybe_slow(text.len());
        let mut v: Vec<u32> = Vec::new();
        if add_special {
            v.push(BOS);
        }
        v.extend(text.bytes().map(u32::from));
        v
    }
    fn piece(&self, id: u32, special: bool) -> Vec<u8> {
        match id {
            0..=255 => vec![id as u8],
            EOG if special => b"</s>".to_vec(),
            BOS if special => b"<s>".to_vec(),
            _ => Vec::new(),
        }
    }
    fn decode(&self, ids: &[u32], special: bool) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.piece(i, special)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    fn is_eog(&self, id: u32) -> bool {
        id == EOG
    }
    fn rerank_tokens(&self, query: &str, doc: &str) -> Vec<u32> {
        let mut v = self.encode(query, true, false);
        v.push(EOG);
        v.extend(self.encode(doc, false, false));
        v
    }
    fn render_chat(&self, messages: &[serde_json::Value]) -> Result<String, BackendError> {
        self.maybe_slow(
            messages
                .iter()
                .map(|m| m["content"].as_str().map_or(0, str::len))
                .sum(),
        );
        let mut s = String::new();
        for m in messages {
            let role = m["role"].as_str().unwrap_or("?");
            if role == "tool" && m.get("tool_call_id").is_none() {
                return Err(BackendError::Template("tool message without id".into()));
            }
            s.push_str(&format!(
                "{role}: {}\n",
                m["content"].as_str().unwrap_or("")
            ));
        }
        s.push_str("assistant: ");
        Ok(s)
    }
    fn grammar_compiler(&self) -> Option<&GrammarCompiler> {
        Some(&self.grammar)
    }
}

/// What the fake context saw, shared with the test.
#[derive(Clone, Debug, Default)]
pub struct FakeLog(Arc<Mutex<Vec<(usize, usize)>>>);

impl FakeLog {
    /// Every forward pass so far: (distinct sequences, tokens).
    pub fn decodes(&self) -> Vec<(usize, usize)> {
        self.0.lock().unwrap().clone()
    }
    /// The most distinct sequences one forward pass held.
    pub fn max_seqs_per_decode(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|x| x.0)
            .max()
            .unwrap_or(0)
    }
    /// The most tokens one forward pass held.
    pub fn max_tokens_per_decode(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|x| x.1)
            .max()
            .unwrap_or(0)
    }
}

/// A context of `n_seq` sequences of `n_ctx` cells each.
#[derive(Debug)]
pub struct FakeCompute {
    seqs: Vec<Vec<u32>>,
    n_ctx: usize,
    outputs: Vec<Vec<f32>>,
    log: FakeLog,
    delay: std::time::Duration,
    can_shift: bool,
}

impl FakeCompute {
    /// A fresh context.
    pub fn new(n_seq: usize, n_ctx: usize, log: FakeLog) -> Self {
        FakeCompute {
            seqs: vec![Vec::new(); n_seq],
            n_ctx,
            outputs: Vec::new(),
            log,
            delay: std::time::Duration::ZERO,
            can_shift: true,
        }
    }

    /// A compute whose cache cannot shift (a sliding-window model's).
    pub fn without_shift(mut self) -> Self {
        self.can_shift = false;
        self
    }

    /// Makes every forward pass take at least `d` (to let tests act mid-generation).
    pub fn with_step_delay(mut self, d: std::time::Duration) -> Self {
        self.delay = d;
        self
    }
}

struct Argmax;

impl TokenSampler for Argmax {
    fn sample(&mut self, logits: &[f32], _history: &[u32]) -> u32 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best as u32
    }
}

impl Compute for FakeCompute {
    fn decode(&mut self, batch: &BatchPlan) -> Result<(), BackendError> {
        self.outputs.clear();
        std::thread::sleep(self.delay);
        let mut seen = Vec::new();
        for i in 0..batch.len() {
            let (t, pos, seq) = (batch.tokens[i], batch.pos[i] as usize, batch.seq_id[i]);
            let s = self
                .seqs
                .get_mut(seq as usize)
                .ok_or_else(|| BackendError::Engine(format!("unknown sequence {seq}")))?;
            if pos != s.len() || pos >= self.n_ctx || t as usize >= N_VOCAB {
                return Err(BackendError::Engine(format!(
                    "token {t} at position {pos} of sequence {seq} (holds {}, n_ctx {})",
                    s.len(),
                    self.n_ctx
                )));
            }
            s.push(t);
            if !seen.contains(&seq) {
                seen.push(seq);
            }
            if batch.logits[i] {
                let next = next_token(s);
                let mut l = vec![0.0; N_VOCAB];
                l[next as usize] = 10.0;
                l[(next as usize + 1) % N_VOCAB] = 5.0;
                self.outputs.push(l);
            }
        }
        self.log.0.lock().unwrap().push((seen.len(), batch.len()));
        Ok(())
    }
    fn logits(&self, i: usize) -> &[f32] {
        &self.outputs[i]
    }
    fn embed(
        &mut self,
        tokens: &[u32],
        pooling: Option<super::backend::Pooling>,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        if pooling == Some(super::backend::Pooling::None) {
            return Ok(tokens
                .iter()
                .map(|&t| vec![t as f32, 1.0, 0.0, 0.0])
                .collect());
        }
        let s: f32 = tokens.iter().map(|&t| t as f32).sum();
        Ok(vec![vec![tokens.len() as f32, s, 1.0, 0.0]])
    }
    fn seq_clear(&mut self, seq: u32) {
        if let Some(s) = self.seqs.get_mut(seq as usize) {
            s.clear();
        }
    }
    fn seq_keep(&mut self, seq: u32, n: usize) -> bool {
        if let Some(s) = self.seqs.get_mut(seq as usize) {
            s.truncate(n);
        }
        true
    }
    fn can_shift(&self) -> bool {
        self.can_shift
    }
    fn seq_shift(&mut self, seq: u32, n_keep: usize, n_discard: usize) -> bool {
        match self.seqs.get_mut(seq as usize) {
            Some(s) if self.can_shift && n_keep + n_discard <= s.len() => {
                s.drain(n_keep..n_keep + n_discard);
                true
            }
            _ => false,
        }
    }
    fn sampler(&self, _params: &SamplingParams) -> Box<dyn TokenSampler> {
        Box::new(Argmax)
    }
    /// The fake's slot file: `FAKESLOT` then the tokens (u32 LE).
    fn seq_save(&self, seq: u32, tokens: &[u32]) -> Result<Vec<u8>, BackendError> {
        let s = self
            .seqs
            .get(seq as usize)
            .ok_or_else(|| BackendError::Engine(format!("unknown sequence {seq}")))?;
        if s.as_slice() != tokens {
            return Err(BackendError::Engine(format!(
                "sequence {seq} holds {} tokens, not the {} given",
                s.len(),
                tokens.len()
            )));
        }
        let mut out = FAKE_MAGIC.to_vec();
        tokens
            .iter()
            .for_each(|t| out.extend_from_slice(&t.to_le_bytes()));
        Ok(out)
    }
    fn seq_restore(&mut self, seq: u32, bytes: &[u8]) -> Result<Vec<u32>, BackendError> {
        let body = bytes
            .strip_prefix(FAKE_MAGIC)
            .filter(|b| b.len() % 4 == 0 && b.len() / 4 <= self.n_ctx)
            .ok_or_else(|| BackendError::SlotFile("not a fake slot file".into()))?;
        let tokens: Vec<u32> = body
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let s = self
            .seqs
            .get_mut(seq as usize)
            .ok_or_else(|| BackendError::Engine(format!("unknown sequence {seq}")))?;
        s.clone_from(&tokens);
        Ok(tokens)
    }
    fn seq_state_max_bytes(&self) -> usize {
        FAKE_MAGIC.len() + 4 * self.n_ctx
    }
}

/// The first bytes of the fake's slot files.
const FAKE_MAGIC: &[u8] = b"FAKESLOT";
