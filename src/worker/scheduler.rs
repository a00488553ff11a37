//! The scheduler: a `std::thread` that owns the engine's context and runs continuous batching over the
//! slots. HTTP handlers send [`Command`]s over a channel; each generation request carries its own event
//! sender and cancellation token (the structure of llama-server's `server-queue.h` / `server-context.cpp`,
//! commit 0c1e570).
//!
//! One loop iteration ("step"): take new commands; free the slots of cancelled requests; admit queued
//! requests into free slots (FIFO; `pick_slot` chooses the slot: the longest shared prefix, else the
//! least recently used); then run ONE forward pass holding the next token of every generating slot plus
//! prompt chunks of prefilling slots, up to `n_batch` tokens; sample, stream, and finish slots. A freed
//! slot is reused by a queued request in the very next step.
//!
//! Prefix reuse (llama-server's `cache_prompt`): an idle slot keeps the KV cells of its last request;
//! a new request keeps the longest common prefix of its prompt with them (at least one prompt token is
//! always evaluated again, so that logits exist) and evaluates only the rest. The engine is
//! batch-invariant, so the answer is bit-identical to a cold run.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc::UnboundedSender, oneshot};
use tokio_util::sync::CancellationToken;

use super::backend::{
    BackendError, BatchPlan, Codec, Compute, SamplingParams, TokenSampler, logprobs,
};
use super::metrics::Metrics;
use super::slot::{SlotEvent, SlotState, transition};
use super::text::TextAssembler;
use crate::engine::constraint::{Constraint, ConstraintError, TokenMask};
use crate::engine::sampling::mask_logits;
use crate::openai::FinishReason;

/// One generated token as reported to the client.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenOut {
    /// Token id.
    pub id: u32,
    /// Its piece (bytes).
    pub bytes: Vec<u8>,
    /// Natural log-probability under the raw logits, when asked for.
    pub logprob: Option<f32>,
    /// The most likely alternatives: (id, logprob, bytes), best first.
    pub top: Vec<(u32, f32, Vec<u8>)>,
}

/// What a generation request hears back, in order: any number of `Delta`s, then `Done` or `Failed`.
#[derive(Debug)]
pub enum GenEvent {
    /// New text (stop strings removed) and the tokens it came from.
    Delta {
        /// Text to append.
        text: String,
        /// Tokens whose text is (partly) in `text`.
        tokens: Vec<TokenOut>,
    },
    /// The request ended.
    Done {
        /// Why.
        finish: FinishReason,
        /// Prompt tokens (cached ones included).
        n_prompt: usize,
        /// Prompt tokens reused from the slot's cache.
        n_cached: usize,
        /// Tokens generated (the end-of-generation token not counted).
        n_generated: usize,
        /// What ended it, in llama-server's terms (`stop_type`, `stopping_word`).
        stop: StopType,
        /// The slot that ran it.
        id_slot: usize,
        /// Tokens the slot's KV cache holds at the end (llama-server's `tokens_cached`).
        n_ctx_used: usize,
        /// The generation reached the end of the slot's context: it stopped there, or (context shift)
        /// dropped tokens and went on (llama-server's `truncated`).
        truncated: bool,
        /// From admission to the first sampled token (prompt evaluation).
        t_prompt: Duration,
        /// From the first sampled token to the end.
        t_gen: Duration,
    },
    /// The engine failed; the message is for the log.
    Failed(String),
}

/// What ended a generation, as llama-server's `stop_type` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopType {
    /// An end-of-generation token (or a complete grammar): `eos`.
    Eos,
    /// A stop string, which is not in the text: `word`.
    Word(String),
    /// `n_predict` or the end of the slot's context: `limit`.
    Limit,
}

impl StopType {
    /// llama-server's `stop_type` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            StopType::Eos => "eos",
            StopType::Word(_) => "word",
            StopType::Limit => "limit",
        }
    }
}

/// A slot as `GET /slots` shows it: its running request, else its last one.
#[derive(Clone, Debug)]
pub struct SlotSnapshot {
    /// Slot id.
    pub id: usize,
    /// Context of the slot (tokens).
    pub n_ctx: usize,
    /// A request is running on it.
    pub is_processing: bool,
    /// The generation settings of its (last) request, as the HTTP layer rendered them.
    pub params: Option<Arc<serde_json::Value>>,
    /// Prompt of its (last) request.
    pub prompt: Vec<u32>,
    /// Prompt tokens evaluated (not reused from the cache).
    pub n_prompt_processed: usize,
    /// Prompt tokens reused from the cache.
    pub n_prompt_cached: usize,
    /// Tokens generated so far.
    pub n_decoded: usize,
    /// Tokens it may still generate (`n_predict` − generated; -1 = unbounded).
    pub n_remain: i64,
    /// The request goes on.
    pub has_next_token: bool,
    /// Text generated so far.
    pub generated: String,
    /// Whether a request ever ran on it.
    pub used: bool,
}

/// A generation request.
#[derive(Debug)]
pub struct GenerateRequest {
    /// Prompt tokens (non-empty, shorter than the slot context).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (≥ 1).
    pub max_tokens: usize,
    /// Sampler settings.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stops: Vec<String>,
    /// `Some(k)`: report each token's log-probability and its `k` best alternatives.
    pub n_probs: Option<usize>,
    /// The grammar the output must follow, compiled before queueing (each choice has its own); the
    /// slot stops with `stop` once it is complete.
    pub constraint: Option<Constraint>,
    /// Where events go.
    pub events: UnboundedSender<GenEvent>,
    /// Cancelled when the client goes away.
    pub cancel: CancellationToken,
    /// Run on this slot (llama-server's `id_slot`; waits for it when busy); `None` = any.
    pub id_slot: Option<usize>,
    /// Reuse the slot's cached prefix (llama-server's `cache_prompt`, default true); false evaluates
    /// the whole prompt again.
    pub cache_prompt: bool,
    /// Report probabilities after the sampler chain instead of the raw log-softmax (llama-server's
    /// `post_sampling_probs`): `TokenOut::logprob` and `top` then hold ln of those probabilities.
    pub post_sampling_probs: bool,
    /// The request's generation settings, rendered by the HTTP layer, for `GET /slots`.
    pub settings: Option<Arc<serde_json::Value>>,
    /// Context shift: prompt tokens kept at the start (llama-server's `n_keep`; -1 = the whole
    /// prompt; the BOS is kept on top when the model adds one).
    pub n_keep: i64,
    /// Context shift: tokens dropped after the kept ones (llama-server's `n_discard`; 0 = half of
    /// what follows them).
    pub n_discard: usize,
}

impl GenerateRequest {
    /// A request with llama-server's defaults for the native fields (any slot, prompt cache on,
    /// raw log-probabilities, no settings shown).
    pub fn new(
        prompt: Vec<u32>,
        max_tokens: usize,
        sampling: SamplingParams,
        events: UnboundedSender<GenEvent>,
        cancel: CancellationToken,
    ) -> GenerateRequest {
        GenerateRequest {
            prompt,
            max_tokens,
            sampling,
            stops: Vec::new(),
            n_probs: None,
            constraint: None,
            events,
            cancel,
            id_slot: None,
            cache_prompt: true,
            post_sampling_probs: false,
            settings: None,
            n_keep: 0,
            n_discard: 0,
        }
    }
}

/// An embedding request: tokens in, rows `[n_embd]` out, not normalised (one per token for
/// `Pooling::None`, else one pooled row).
#[derive(Debug)]
pub struct EmbedRequest {
    /// Tokens (non-empty).
    pub tokens: Vec<u32>,
    /// `--pooling` (`None` = the model's).
    pub pooling: Option<super::backend::Pooling>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// What `POST /slots/{id_slot}?action=…` asks of one slot (llama-server's `SERVER_TASK_TYPE_SLOT_SAVE`,
/// `_RESTORE`, `_ERASE`, tools/server/server-context.cpp). The file itself is read and written by the
/// HTTP layer on a blocking thread: the engine thread only copies cells.
#[derive(Debug)]
pub enum SlotAction {
    /// The slot's tokens and KV cells as a slot file ([`Compute::seq_save`]).
    Save,
    /// Replace the slot's content with a slot file's bytes ([`Compute::seq_restore`]).
    Restore(Vec<u8>),
    /// Drop the slot's cached tokens and cells.
    Erase,
}

/// The outcome of a [`SlotAction`].
#[derive(Debug)]
pub enum SlotActionDone {
    /// The slot file and the tokens it holds.
    Saved {
        /// The file's bytes.
        bytes: Vec<u8>,
        /// Tokens saved (llama-server's `n_saved`).
        n_tokens: usize,
    },
    /// Tokens now cached by the slot (`n_restored`).
    Restored(usize),
    /// Tokens the slot held before (`n_erased`).
    Erased(usize),
}

/// A [`SlotAction`] on slot `id_slot`. Like llama-server, an action on a slot that is processing a
/// request waits (deferred) until it is idle; one whose `reply` is dropped meanwhile is discarded.
#[derive(Debug)]
pub struct SlotActionRequest {
    /// The slot (< n_slots, checked by the HTTP layer).
    pub id_slot: usize,
    /// What to do.
    pub action: SlotAction,
    /// Where the outcome goes, with the engine thread's time on it (not counting the wait for a busy
    /// slot): [`BackendError::SlotFile`] for a refused file (the slot unchanged),
    /// [`BackendError::Unsupported`] for a model without a KV cache.
    pub reply: oneshot::Sender<Result<(SlotActionDone, Duration), BackendError>>,
}

/// Messages to the scheduler thread.
#[derive(Debug)]
pub enum Command {
    /// Queue a generation (boxed: a request is far larger than the other commands).
    Generate(Box<GenerateRequest>),
    /// Compute an embedding (between steps).
    Embed(EmbedRequest),
    /// Report every slot's state (`GET /slots`).
    Slots(oneshot::Sender<Vec<SlotSnapshot>>),
    /// Save, restore or erase one slot's cache (between steps, once the slot is idle).
    SlotAction(SlotActionRequest),
    /// Cancel everything and stop the thread.
    Shutdown,
}

/// Sizes of the scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Slots (sequences of the context).
    pub n_slots: usize,
    /// Context per slot (tokens).
    pub n_ctx_seq: usize,
    /// Most tokens in one forward pass (≥ n_slots).
    pub n_batch: usize,
    /// llama-server's `--context-shift`: a generation reaching the end of its slot's context drops
    /// tokens after `n_keep` and goes on, instead of stopping with `length`. Turned off, with a
    /// warning, by [`spawn`] when the compute cannot shift.
    pub ctx_shift: bool,
}

struct Job {
    req: GenerateRequest,
    /// Prompt tokens already in the KV cache.
    n_done: usize,
    n_cached: usize,
    /// Prompt + generated tokens, for the penalties.
    history: Vec<u32>,
    n_generated: usize,
    /// Sampled but not yet evaluated.
    pending: Option<u32>,
    sampler: Box<dyn TokenSampler>,
    text: TextAssembler<TokenOut>,
    admitted: u64,
    /// The request's grammar (taken from the request at admission).
    constraint: Option<Constraint>,
    /// The allowed tokens for the next sample, computed beside the forward pass that produces its logits.
    mask: Option<Result<TokenMask, ConstraintError>>,
    /// Tokens that close a JSON reply the budget would cut ([`Constraint::closing_for_budget`]), emitted
    /// one per step instead of sampling; `closing` once they were queued (the reply then ends with
    /// `finish_reason: length` when they are out).
    forced: VecDeque<u32>,
    closing: bool,
    /// When it was admitted, and when its first token was sampled.
    t_admit: Instant,
    t_first: Option<Instant>,
    /// Text generated so far (for `GET /slots`; bounded by the slot's context).
    generated: String,
    /// The generation reached the end of the slot's context (llama-server's `truncated`).
    truncated: bool,
}

/// What a slot remembers of its last request for `GET /slots`.
#[derive(Clone, Debug, Default)]
struct LastTask {
    params: Option<Arc<serde_json::Value>>,
    prompt: Vec<u32>,
    n_cached: usize,
    n_generated: usize,
    max_tokens: usize,
    generated: String,
}

struct Slot {
    id: u32,
    state: SlotState,
    /// Tokens whose KV cells sequence `id` holds, position order.
    cache: Vec<u32>,
    job: Option<Job>,
    /// Admission number of its last request (0 = never used), for least-recently-used choice.
    last_used: u64,
    /// Its last finished request, for `GET /slots`.
    last: Option<LastTask>,
}

/// Smallest share of an idle slot's cached tokens that a prompt must repeat for that slot to be chosen
/// for its prefix (llama-server's `--slot-prompt-similarity`, default 0.1); below it the least recently
/// used slot is taken, so one short shared prefix does not evict a long cache another client will reuse.
const SLOT_PROMPT_SIMILARITY: f32 = 0.1;

/// The idle slot for `prompt`, as llama-server picks it: the one whose cache shares the longest prefix
/// with the prompt, among those whose similarity (common prefix / cached tokens) exceeds
/// [`SLOT_PROMPT_SIMILARITY`]; otherwise the least recently used idle slot. `None` when all are busy.
fn pick_slot(slots: &[Slot], prompt: &[u32]) -> Option<usize> {
    let idle = || slots.iter().enumerate().filter(|(_, s)| s.job.is_none());
    let similar = idle()
        .map(|(i, s)| (i, s, common_prefix(&s.cache, prompt)))
        .filter(|&(_, s, lcp)| {
            lcp > 0 && lcp as f32 / s.cache.len() as f32 > SLOT_PROMPT_SIMILARITY
        })
        .max_by_key(|&(_, s, lcp)| (lcp, std::cmp::Reverse(s.last_used)))
        .map(|(i, _, _)| i);
    similar.or_else(|| {
        idle()
            .min_by_key(|(i, s)| (s.last_used, *i))
            .map(|(i, _)| i)
    })
}

/// The scheduler's state; runs on its own thread (see [`spawn`]).
pub struct Scheduler {
    codec: Arc<dyn Codec>,
    compute: Box<dyn Compute>,
    cfg: SchedulerConfig,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<Command>,
    queue: VecDeque<GenerateRequest>,
    /// Slot actions waiting for their slot to be idle, in arrival order (bounded by the HTTP layer's
    /// admission permits, which `POST /slots/{id}` takes like a generation).
    actions: VecDeque<SlotActionRequest>,
    slots: Vec<Slot>,
    admissions: u64,
    closing: bool,
}

/// Starts the scheduler thread. Returns the command sender and the thread's handle; the thread ends on
/// [`Command::Shutdown`] or when every sender is dropped and no request is left.
///
/// Errors: the OS refused to start a thread.
pub fn spawn(
    codec: Arc<dyn Codec>,
    compute: Box<dyn Compute>,
    cfg: SchedulerConfig,
    metrics: Arc<Metrics>,
) -> std::io::Result<(mpsc::Sender<Command>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let mut cfg = cfg;
    if cfg.ctx_shift && !compute.can_shift() {
        // llama-server: "ctx_shift is not supported by this context, it will be disabled".
        tracing::warn!(
            "--context-shift is not supported by this model's KV cache (a sliding-window cache \
             smaller than the context), it will be disabled"
        );
        cfg.ctx_shift = false;
    }
    metrics.slots_total.store(cfg.n_slots as u64, Relaxed);
    let sched = Scheduler {
        codec,
        compute,
        cfg,
        metrics,
        rx,
        queue: VecDeque::new(),
        actions: VecDeque::new(),
        slots: (0..cfg.n_slots as u32)
            .map(|id| Slot {
                id,
                state: SlotState::Idle,
                cache: Vec::new(),
                job: None,
                last_used: 0,
                last: None,
            })
            .collect(),
        admissions: 0,
        closing: false,
    };
    let handle = std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || sched.run())?;
    Ok((tx, handle))
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Scheduler {
    fn busy(&self) -> bool {
        !self.queue.is_empty()
            || !self.actions.is_empty()
            || self.slots.iter().any(|s| s.job.is_some())
    }

    fn run(mut self) {
        loop {
            if !self.busy() {
                if self.closing {
                    return;
                }
                match self.rx.recv() {
                    Ok(Command::Shutdown) => return,
                    Ok(c) => self.accept(c),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(Command::Shutdown) => {
                        self.cancel_all();
                        return;
                    }
                    Ok(c) => self.accept(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.closing = true;
                        break;
                    }
                }
            }
            self.free_cancelled();
            self.run_slot_actions();
            self.admit();
            self.update_gauges();
            let busy = self.slots.iter().filter(|s| s.job.is_some()).count();
            if !self.queue.is_empty() && busy < self.slots.len() {
                self.metrics.queue_stall_steps.fetch_add(1, Relaxed);
            }
            if busy > 0 {
                self.step();
                // Slots freed by this step show at once, also when the loop now goes idle.
                self.update_gauges();
            }
        }
    }

    fn accept(&mut self, c: Command) {
        match c {
            Command::Generate(r) => self.queue.push_back(*r),
            Command::Embed(e) => {
                let t = Instant::now();
                let r = self
                    .compute
                    .embed(&e.tokens, e.pooling)
                    .map_err(|e| e.to_string());
                self.metrics.add_step_time(t.elapsed(), false);
                if r.is_ok() {
                    self.metrics
                        .prompt_tokens
                        .fetch_add(e.tokens.len() as u64, Relaxed);
                }
                let _ = e.reply.send(r);
            }
            Command::Slots(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Command::SlotAction(a) => self.actions.push_back(a),
            Command::Shutdown => {}
        }
    }

    /// Runs every waiting slot action whose slot is idle, in arrival order (those of a busy slot wait;
    /// those whose client went away are dropped).
    fn run_slot_actions(&mut self) {
        let mut i = 0;
        while i < self.actions.len() {
            let a = &self.actions[i];
            if a.reply.is_closed() {
                self.actions.remove(i);
                continue;
            }
            if self.slots.get(a.id_slot).is_some_and(|s| s.job.is_some()) {
                i += 1;
                continue;
            }
            let Some(a) = self.actions.remove(i) else {
                break;
            };
            let t = Instant::now();
            let r = self.slot_action(a.id_slot, a.action);
            let took = t.elapsed();
            tracing::debug!(
                slot = a.id_slot,
                ms = took.as_secs_f64() * 1e3,
                ok = r.is_ok(),
                "slot action"
            );
            let _ = a.reply.send(r.map(|d| (d, took)));
        }
    }

    /// One slot action on idle slot `i`. A restore replaces the slot's cached tokens with the file's
    /// (the next request on it reuses their common prefix, as after a request of its own) and marks it
    /// recently used; a refused file leaves the slot as it was.
    fn slot_action(
        &mut self,
        i: usize,
        action: SlotAction,
    ) -> Result<SlotActionDone, BackendError> {
        let Some(slot) = self.slots.get_mut(i) else {
            return Err(BackendError::Engine(format!(
                "slot {i} does not exist ({} slots)",
                self.cfg.n_slots
            )));
        };
        match action {
            SlotAction::Save => {
                let bytes = self.compute.seq_save(slot.id, &slot.cache)?;
                Ok(SlotActionDone::Saved {
                    bytes,
                    n_tokens: slot.cache.len(),
                })
            }
            SlotAction::Restore(bytes) => {
                let tokens = self.compute.seq_restore(slot.id, &bytes)?;
                let n = tokens.len();
                slot.cache = tokens;
                slot.last = None;
                self.admissions += 1;
                slot.last_used = self.admissions;
                Ok(SlotActionDone::Restored(n))
            }
            SlotAction::Erase => {
                let n = slot.cache.len();
                self.compute.seq_clear(slot.id);
                slot.cache.clear();
                slot.last = None;
                Ok(SlotActionDone::Erased(n))
            }
        }
    }

    /// Every slot as `GET /slots` shows it.
    fn snapshot(&self) -> Vec<SlotSnapshot> {
        self.slots
            .iter()
            .map(|s| {
                let (last, running) = match &s.job {
                    Some(j) => (
                        LastTask {
                            params: j.req.settings.clone(),
                            prompt: j.req.prompt.clone(),
                            n_cached: j.n_cached,
                            n_generated: j.n_generated,
                            max_tokens: j.req.max_tokens,
                            generated: j.generated.clone(),
                        },
                        true,
                    ),
                    None => (s.last.clone().unwrap_or_default(), false),
                };
                SlotSnapshot {
                    id: s.id as usize,
                    n_ctx: self.cfg.n_ctx_seq,
                    is_processing: running,
                    params: last.params,
                    n_prompt_processed: last.prompt.len().saturating_sub(last.n_cached),
                    n_prompt_cached: last.n_cached,
                    prompt: last.prompt,
                    n_decoded: last.n_generated,
                    n_remain: if running {
                        last.max_tokens.saturating_sub(last.n_generated) as i64
                    } else {
                        0
                    },
                    has_next_token: running,
                    generated: last.generated,
                    used: running || s.last.is_some(),
                }
            })
            .collect()
    }

    fn cancel_all(&mut self) {
        for r in self.queue.drain(..) {
            let _ = r
                .events
                .send(GenEvent::Failed("the worker is shutting down".into()));
        }
        for i in 0..self.slots.len() {
            if let Some(job) = &self.slots[i].job {
                let _ = job
                    .req
                    .events
                    .send(GenEvent::Failed("the worker is shutting down".into()));
                self.release(i, SlotEvent::Cancel);
            }
        }
    }

    fn free_cancelled(&mut self) {
        for i in 0..self.slots.len() {
            let gone = self.slots[i]
                .job
                .as_ref()
                .is_some_and(|j| j.req.cancel.is_cancelled() || j.req.events.is_closed());
            if gone {
                self.metrics.requests_cancelled.fetch_add(1, Relaxed);
                tracing::debug!(slot = i, "client went away; slot freed");
                self.release(i, SlotEvent::Cancel);
            }
        }
    }

    /// Moves slot `i` back to idle through the checked transition, dropping its job.
    fn release(&mut self, i: usize, event: SlotEvent) {
        let slot = &mut self.slots[i];
        match transition(slot.state, event) {
            Ok(s) => slot.state = s,
            Err(e) => {
                tracing::error!("{e}");
                slot.state = SlotState::Idle;
            }
        }
        if let Some(j) = slot.job.take() {
            slot.last = Some(LastTask {
                params: j.req.settings,
                prompt: j.req.prompt,
                n_cached: j.n_cached,
                n_generated: j.n_generated,
                max_tokens: j.req.max_tokens,
                generated: j.generated,
            });
        }
    }

    fn set_state(&mut self, i: usize, event: SlotEvent) {
        let slot = &mut self.slots[i];
        match transition(slot.state, event) {
            Ok(s) => slot.state = s,
            Err(e) => tracing::error!("slot {}: {e}", slot.id),
        }
    }

    fn admit(&mut self) {
        // FIFO, except that a request bound to a busy slot (`id_slot`) lets the ones behind it pass.
        let mut qi = 0;
        while qi < self.queue.len() {
            let front = &self.queue[qi];
            if front.cancel.is_cancelled() || front.events.is_closed() {
                self.queue.remove(qi);
                self.metrics.requests_cancelled.fetch_add(1, Relaxed);
                continue;
            }
            let pick = match front.id_slot {
                Some(want) => self
                    .slots
                    .get(want)
                    .is_some_and(|s| s.job.is_none())
                    .then_some(want),
                None => pick_slot(&self.slots, &front.prompt),
            };
            let Some(i) = pick else {
                if front.id_slot.is_some() && self.slots.iter().any(|s| s.job.is_none()) {
                    qi += 1;
                    continue;
                }
                break;
            };
            let Some(mut req) = self.queue.remove(qi) else {
                break;
            };
            if req.prompt.is_empty() || req.prompt.len() >= self.cfg.n_ctx_seq {
                let _ = req.events.send(GenEvent::Failed(format!(
                    "prompt of {} tokens does not fit the slot context of {}",
                    req.prompt.len(),
                    self.cfg.n_ctx_seq
                )));
                continue;
            }
            let slot = &mut self.slots[i];
            let lcp = if req.cache_prompt {
                common_prefix(&slot.cache, &req.prompt)
            } else {
                0
            };
            // At least one prompt token must be evaluated to get logits for the first sampled token.
            let keep = lcp.min(req.prompt.len() - 1);
            if keep < slot.cache.len() {
                if keep > 0 && self.compute.seq_keep(slot.id, keep) {
                    slot.cache.truncate(keep);
                } else {
                    self.compute.seq_clear(slot.id);
                    slot.cache.clear();
                }
            }
            let n_cached = slot.cache.len();
            self.metrics
                .prompt_tokens_cached
                .fetch_add(n_cached as u64, Relaxed);
            let sampler = self.compute.sampler(&req.sampling);
            self.admissions += 1;
            let job = Job {
                constraint: req.constraint.take(),
                mask: None,
                forced: VecDeque::new(),
                closing: false,
                history: req.prompt.clone(),
                text: TextAssembler::new(req.stops.clone()),
                n_done: n_cached,
                n_cached,
                n_generated: 0,
                pending: None,
                sampler,
                admitted: self.admissions,
                t_admit: Instant::now(),
                t_first: None,
                generated: String::new(),
                truncated: false,
                req,
            };
            let slot = &mut self.slots[i];
            slot.job = Some(job);
            slot.last_used = self.admissions;
            self.set_state(i, SlotEvent::Admit);
            tracing::debug!(slot = i, n_cached, "request admitted");
        }
    }

    fn update_gauges(&self) {
        let busy = self.slots.iter().filter(|s| s.job.is_some()).count();
        self.metrics.slots_busy.store(busy as u64, Relaxed);
        self.metrics
            .queue_length
            .store(self.queue.len() as u64, Relaxed);
    }

    /// One batched forward pass over every active slot, then sampling and streaming.
    fn step(&mut self) {
        self.shift_contexts();
        let mut batch = BatchPlan::default();
        // (slot index, tokens added to the batch, produces an output)
        let mut plan: Vec<(usize, usize, bool)> = Vec::new();
        let mut budget = self.cfg.n_batch;
        for (i, slot) in self.slots.iter().enumerate() {
            if let (SlotState::Generating, Some(job)) = (slot.state, &slot.job)
                && let Some(t) = job.pending
            {
                batch.push(t, slot.cache.len() as u32, slot.id, true);
                plan.push((i, 1, true));
                budget = budget.saturating_sub(1);
            }
        }
        // Prompt chunks, oldest admission first.
        let mut prefilling: Vec<(u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == SlotState::Prefill)
            .filter_map(|(i, s)| s.job.as_ref().map(|j| (j.admitted, i)))
            .collect();
        prefilling.sort_unstable();
        for (_, i) in prefilling {
            if budget == 0 {
                break;
            }
            let slot = &self.slots[i];
            let Some(job) = &slot.job else { continue };
            let rest = &job.req.prompt[job.n_done..];
            let take = rest.len().min(budget);
            let last = take == rest.len();
            for (j, &t) in rest[..take].iter().enumerate() {
                let out = last && j + 1 == take;
                batch.push(t, (slot.cache.len() + j) as u32, slot.id, out);
            }
            plan.push((i, take, last));
            budget -= take;
        }
        if batch.is_empty() {
            return;
        }
        let generating = plan
            .iter()
            .any(|&(i, _, _)| self.slots[i].state == SlotState::Generating);
        // The grammars of the slots sampling after this pass: their masks are computed on their own
        // threads while the forward pass runs (a matcher's state changes only when a token is committed,
        // after sampling), so a constrained slot costs the batch max(forward, mask), not the sum.
        let mut grammars: Vec<(usize, Constraint)> = plan
            .iter()
            .filter(|&&(_, _, out)| out)
            .filter_map(|&(i, _, _)| {
                let job = self.slots[i].job.as_mut()?;
                job.constraint.take().map(|c| (i, c))
            })
            .collect();
        let t0 = Instant::now();
        let result = if grammars.is_empty() {
            self.compute.decode(&batch)
        } else {
            let compute = &mut self.compute;
            let (result, masks) = std::thread::scope(|s| {
                let handles: Vec<_> = grammars
                    .iter_mut()
                    .map(|(_, c)| {
                        std::thread::Builder::new()
                            .name("grammar-mask".into())
                            .spawn_scoped(s, move || c.compute_mask())
                    })
                    .collect();
                let result = compute.decode(&batch);
                let masks: Vec<Result<TokenMask, ConstraintError>> = handles
                    .into_iter()
                    .map(|h| match h {
                        Ok(h) => h.join().unwrap_or_else(|_| {
                            Err(ConstraintError::Matcher("the mask thread panicked".into()))
                        }),
                        Err(e) => Err(ConstraintError::Matcher(format!(
                            "cannot start the mask thread: {e}"
                        ))),
                    })
                    .collect();
                (result, masks)
            });
            for ((i, c), m) in grammars.into_iter().zip(masks) {
                if let Some(job) = self.slots[i].job.as_mut() {
                    job.constraint = Some(c);
                    job.mask = Some(m);
                }
            }
            result
        };
        self.metrics.add_step_time(t0.elapsed(), generating);
        if let Err(e) = result {
            self.fail_batch(&plan, &e);
            return;
        }
        // Record what is now in each slot's KV cache.
        let mut offset = 0;
        for &(i, n, _) in &plan {
            let slot = &mut self.slots[i];
            slot.cache
                .extend_from_slice(&batch.tokens[offset..offset + n]);
            offset += n;
            if slot.state == SlotState::Prefill
                && let Some(job) = slot.job.as_mut()
            {
                job.n_done += n;
                self.metrics.prompt_tokens.fetch_add(n as u64, Relaxed);
            }
        }
        let mut out_index = 0;
        for &(i, _, has_output) in &plan {
            if has_output {
                self.on_output(i, out_index);
                out_index += 1;
            } else {
                self.set_state(i, SlotEvent::Chunk);
            }
        }
    }

    /// llama-server's `pre_decode` context shift: every generating slot whose next token would not fit
    /// its context keeps `n_keep` tokens (the whole prompt for -1, plus the BOS when the model adds one,
    /// at most `n_ctx - 4`), drops `n_discard` after them (default half of the rest, at most all but
    /// one) and shifts the others back (tools/server/server-context.cpp). A slot whose engine refuses
    /// the shift ends with `length`.
    fn shift_contexts(&mut self) {
        if !self.cfg.ctx_shift {
            return;
        }
        let n_ctx = self.cfg.n_ctx_seq as i64;
        let add_bos = self.codec.info().add_bos.is_some();
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            let Some(job) = slot.job.as_mut() else {
                continue;
            };
            if slot.state != SlotState::Generating
                || job.pending.is_none()
                || (slot.cache.len() as i64) + 1 < n_ctx
            {
                continue;
            }
            let mut n_keep = if job.req.n_keep < 0 {
                job.req.prompt.len() as i64
            } else {
                job.req.n_keep
            };
            if add_bos {
                n_keep += 1;
            }
            let n_keep = n_keep.min(n_ctx - 4).max(0);
            let n_left = slot.cache.len() as i64 - n_keep;
            let n_discard = if job.req.n_discard > 0 {
                job.req.n_discard as i64
            } else {
                n_left / 2
            };
            let n_discard = n_discard.clamp(0, (n_left - 1).max(0));
            let (keep, discard) = (n_keep as usize, n_discard as usize);
            tracing::warn!(slot = i, n_keep, n_left, n_discard, "slot context shift");
            if discard > 0 && self.compute.seq_shift(slot.id, keep, discard) {
                slot.cache.drain(keep..keep + discard);
                job.truncated = true;
            } else {
                job.truncated = true;
                job.pending = None;
                self.finish(i, FinishReason::Length, StopType::Limit);
            }
        }
    }

    fn fail_batch(&mut self, plan: &[(usize, usize, bool)], e: &BackendError) {
        tracing::error!("forward pass failed: {e}");
        for &(i, _, _) in plan {
            let id = self.slots[i].id;
            self.compute.seq_clear(id);
            self.slots[i].cache.clear();
            if let Some(job) = &self.slots[i].job {
                let _ = job.req.events.send(GenEvent::Failed(e.to_string()));
            }
            self.release(i, SlotEvent::Fail);
        }
    }

    /// Ends slot `i`'s request with `message` (a grammar failure), keeping its KV cache for reuse.
    fn fail_slot(&mut self, i: usize, message: &str) {
        tracing::warn!(slot = i, "request failed: {message}");
        if let Some(job) = &self.slots[i].job {
            let _ = job.req.events.send(GenEvent::Failed(message.to_string()));
        }
        self.release(i, SlotEvent::Fail);
        self.update_gauges();
    }

    /// Samples slot `i`'s next token from output `oi` of the last forward pass, streams it and decides
    /// whether the slot goes on.
    fn on_output(&mut self, i: usize, oi: usize) {
        let n_ctx_seq = self.cfg.n_ctx_seq;
        let ctx_shift = self.cfg.ctx_shift;
        let codec = Arc::clone(&self.codec);
        let metrics = Arc::clone(&self.metrics);
        let logits = self.compute.logits(oi);
        let slot = &mut self.slots[i];
        let Some(job) = slot.job.as_mut() else { return };
        // A constrained slot samples from a copy of its logits with the disallowed tokens at -inf;
        // reported log-probabilities stay those of the raw model (llama-server's `n_probs` too are
        // taken before its grammar sampler).
        let masked = match (job.constraint.is_some(), job.mask.take()) {
            (false, _) => None,
            (true, Some(Ok(mask))) => {
                let mut l = logits.to_vec();
                mask_logits(&mut l, mask.words());
                Some(l)
            }
            (true, Some(Err(e))) => return self.fail_slot(i, &e.to_string()),
            (true, None) => return self.fail_slot(i, "grammar mask missing for a sampling step"),
        };
        if job.t_first.is_none() {
            job.t_first = Some(Instant::now());
        }
        // n_predict = 0: the prompt is evaluated into the cache and nothing is generated.
        if job.req.max_tokens == 0 {
            self.set_state(i, SlotEvent::PromptDone);
            return self.finish(i, FinishReason::Length, StopType::Limit);
        }
        let sample_from = masked.as_deref().unwrap_or(logits);
        // The raw model's log-probabilities of `id` (llama-server's `n_probs` before its samplers).
        let raw_logprobs = |id: u32, n_probs: Option<usize>| match n_probs {
            Some(k) => {
                let (lp, top) = logprobs(logits, id, k);
                let top = top
                    .into_iter()
                    .map(|(t, l)| (t, l, codec.piece(t, false)))
                    .collect();
                (id, Some(lp), top)
            }
            None => (id, None, Vec::new()),
        };
        // The tokens this slot may still emit, this one included.
        let budget = {
            let left = job.req.max_tokens.saturating_sub(job.n_generated);
            if ctx_shift {
                left
            } else {
                left.min(n_ctx_seq.saturating_sub(slot.cache.len()))
            }
        };
        let mut end_now = false;
        let (id, logprob, top) = if let Some(t) = job.forced.pop_front() {
            raw_logprobs(t, job.req.n_probs)
        } else {
            let sampled = match job.req.n_probs {
                Some(k) if job.req.post_sampling_probs => {
                    let (id, p, top) = job.sampler.sample_with_probs(sample_from, &job.history, k);
                    let top = top
                        .into_iter()
                        .map(|(t, p)| (t, p.ln(), codec.piece(t, false)))
                        .collect();
                    (id, Some(p.ln()), top)
                }
                n_probs => raw_logprobs(job.sampler.sample(sample_from, &job.history), n_probs),
            };
            // A JSON reply that this token would leave too little budget to close is closed instead.
            match job.constraint.as_mut() {
                Some(c) if !codec.is_eog(sampled.0) => {
                    match c.closing_for_budget(sampled.0, budget) {
                        Some(close) if close.is_empty() => {
                            end_now = true;
                            sampled
                        }
                        Some(close) => {
                            job.forced = close.into();
                            job.closing = true;
                            let t = job.forced.pop_front().unwrap_or(sampled.0);
                            raw_logprobs(t, job.req.n_probs)
                        }
                        None => sampled,
                    }
                }
                _ => sampled,
            }
        };
        let event = if slot.state == SlotState::Prefill {
            SlotEvent::PromptDone
        } else {
            SlotEvent::Token
        };
        self.set_state(i, event);
        if end_now {
            return self.finish(i, FinishReason::Length, StopType::Limit);
        }
        let slot = &mut self.slots[i];
        let Some(job) = slot.job.as_mut() else { return };
        let mut finish = None;
        let mut grammar_done = false;
        if let Some(c) = job.constraint.as_mut()
            && !codec.is_eog(id)
        {
            if let Err(e) = c.commit(id) {
                return self.fail_slot(i, &e.to_string());
            }
            grammar_done = c.is_stopped();
        }
        if codec.is_eog(id) {
            finish = Some((FinishReason::Stop, StopType::Eos));
        } else {
            metrics.generated_tokens.fetch_add(1, Relaxed);
            job.n_generated += 1;
            job.history.push(id);
            let bytes = codec.piece(id, false);
            let out = TokenOut {
                id,
                bytes: bytes.clone(),
                logprob,
                top,
            };
            let r = job.text.push(&bytes, out);
            if !r.text.is_empty() || !r.tokens.is_empty() {
                job.generated.push_str(&r.text);
                let _ = job.req.events.send(GenEvent::Delta {
                    text: r.text,
                    tokens: r.tokens,
                });
            }
            if r.stopped {
                let word = job.text.stop_word().unwrap_or_default().to_string();
                finish = Some((FinishReason::Stop, StopType::Word(word)));
            } else if job.closing && job.forced.is_empty() {
                job.truncated = !ctx_shift && slot.cache.len() + 1 >= n_ctx_seq;
                finish = Some((FinishReason::Length, StopType::Limit));
            } else if grammar_done {
                finish = Some((FinishReason::Stop, StopType::Eos));
            } else if job.n_generated >= job.req.max_tokens {
                finish = Some((FinishReason::Length, StopType::Limit));
            } else if slot.cache.len() + 1 >= n_ctx_seq && !ctx_shift {
                // The cache holds the prompt and all generated tokens but this one: prompt +
                // generated has reached the slot's context, and evaluating this token would
                // exceed it (with context shift, the next step makes room instead).
                job.truncated = true;
                finish = Some((FinishReason::Length, StopType::Limit));
            } else {
                job.pending = Some(id);
            }
        }
        if let Some((finish, stop)) = finish {
            self.finish(i, finish, stop);
        }
    }

    /// Ends slot `i`'s request normally: flushes its held-back text, frees the slot and sends `Done`.
    fn finish(&mut self, i: usize, finish: FinishReason, stop: StopType) {
        let slot = &mut self.slots[i];
        let n_ctx_used = slot.cache.len();
        let id_slot = slot.id as usize;
        let Some(job) = slot.job.as_mut() else { return };
        let r = job.text.finish();
        if !r.text.is_empty() || !r.tokens.is_empty() {
            job.generated.push_str(&r.text);
            let _ = job.req.events.send(GenEvent::Delta {
                text: r.text,
                tokens: r.tokens,
            });
        }
        let now = Instant::now();
        let t_first = job.t_first.unwrap_or(now);
        let done = GenEvent::Done {
            finish,
            n_prompt: job.req.prompt.len(),
            n_cached: job.n_cached,
            n_generated: job.n_generated,
            stop,
            id_slot,
            n_ctx_used,
            truncated: job.truncated,
            t_prompt: t_first.saturating_duration_since(job.t_admit),
            t_gen: now.saturating_duration_since(t_first),
        };
        let events = job.req.events.clone();
        // Free the slot and show it in the gauges before the client hears the end, so that a client
        // reading /metrics after its response never sees its own slot still busy.
        self.release(i, SlotEvent::Finish);
        self.update_gauges();
        let _ = events.send(done);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::constraint::GrammarSpec;
    use crate::worker::fake::{FakeCodec, FakeCompute, FakeLog, next_token};

    pub(crate) fn start(
        n_slots: usize,
        n_ctx_seq: usize,
        n_batch: usize,
    ) -> (
        mpsc::Sender<Command>,
        JoinHandle<()>,
        Arc<Metrics>,
        FakeLog,
        Arc<FakeCodec>,
    ) {
        start_with_step_delay(n_slots, n_ctx_seq, n_batch, std::time::Duration::ZERO)
    }

    /// [`start`] with every forward pass taking at least `delay` (so that requests submitted one after
    /// another are all in flight together even on a loaded machine).
    #[allow(clippy::type_complexity)] // the test harness's handles
    pub(crate) fn start_with_step_delay(
        n_slots: usize,
        n_ctx_seq: usize,
        n_batch: usize,
        delay: std::time::Duration,
    ) -> (
        mpsc::Sender<Command>,
        JoinHandle<()>,
        Arc<Metrics>,
        FakeLog,
        Arc<FakeCodec>,
    ) {
        let codec = Arc::new(FakeCodec::default());
        let log = FakeLog::default();
        let compute = FakeCompute::new(n_slots, n_ctx_seq, log.clone()).with_step_delay(delay);
        let metrics = Arc::new(Metrics::default());
        let (tx, h) = spawn(
            codec.clone(),
            Box::new(compute),
            SchedulerConfig {
                n_slots,
                n_ctx_seq,
                n_batch,
                ctx_shift: false,
            },
            metrics.clone(),
        )
        .unwrap();
        (tx, h, metrics, log, codec)
    }

    pub(crate) fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    fn submit(
        tx: &mpsc::Sender<Command>,
        codec: &FakeCodec,
        prompt: &str,
        max_tokens: usize,
        stops: &[&str],
    ) -> (
        tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
        CancellationToken,
    ) {
        let (etx, erx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        tx.send(Command::Generate(Box::new(GenerateRequest {
            prompt: codec.encode(prompt, true, false),
            max_tokens,
            sampling: greedy(),
            stops: stops.iter().map(|s| s.to_string()).collect(),
            n_probs: Some(2),
            constraint: None,
            events: etx,
            cancel: cancel.clone(),
            id_slot: None,
            cache_prompt: true,
            post_sampling_probs: false,
            settings: None,
            n_keep: 0,
            n_discard: 0,
        })))
        .unwrap();
        (erx, cancel)
    }

    fn collect(
        mut rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
    ) -> (String, Option<FinishReason>, usize, usize) {
        let mut text = String::new();
        let mut n_tok = 0;
        while let Some(e) = rx.blocking_recv() {
            match e {
                GenEvent::Delta { text: t, tokens } => {
                    text.push_str(&t);
                    n_tok += tokens.len();
                    for t in tokens {
                        assert!(t.logprob.unwrap() <= 0.0);
                        assert_eq!(t.top.len(), 2);
                    }
                }
                GenEvent::Done {
                    finish,
                    n_generated,
                    ..
                } => return (text, Some(finish), n_generated, n_tok),
                GenEvent::Failed(m) => panic!("failed: {m}"),
            }
        }
        (text, None, 0, n_tok)
    }

    #[test]
    fn generates_until_max_tokens_then_length() {
        let (tx, h, _m, _log, codec) = start(1, 64, 8);
        let (rx, _c) = submit(&tx, &codec, "abc", 5, &[]);
        let (text, finish, n, n_tok) = collect(rx);
        assert_eq!(finish, Some(FinishReason::Length));
        assert_eq!(n, 5);
        assert_eq!(n_tok, 5);
        assert_eq!(text, codec.expected("abc", 5));
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn concurrent_requests_are_batch_invariant_and_share_forward_passes() {
        let prompts = [
            "hello",
            "a longer prompt here",
            "x",
            "the quick brown fox",
            "zz",
            "q",
        ];
        // 20 ms a pass: the six submissions land while the first ones are still generating.
        let (tx, h, m, log, codec) =
            start_with_step_delay(4, 64, 6, std::time::Duration::from_millis(20));
        let rxs: Vec<_> = prompts
            .iter()
            .map(|p| submit(&tx, &codec, p, 12, &[]))
            .collect();
        for (p, (rx, _c)) in prompts.iter().zip(rxs) {
            let (text, finish, _, _) = collect(rx);
            assert_eq!(finish, Some(FinishReason::Length));
            assert_eq!(text, codec.expected(p, 12), "prompt {p}");
        }
        // Some forward pass evaluated four sequences at once.
        assert_eq!(log.max_seqs_per_decode(), 4);
        assert_eq!(m.queue_stall_steps.load(Relaxed), 0);
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn stop_string_ends_generation_and_is_not_emitted() {
        let (tx, h, _m, _log, codec) = start(1, 64, 8);
        let full = codec.expected("abc", 20);
        let stop = &full[6..9];
        let (rx, _c) = submit(&tx, &codec, "abc", 20, &[stop]);
        let (text, finish, _, _) = collect(rx);
        assert_eq!(finish, Some(FinishReason::Stop));
        let cut = full.find(stop).unwrap();
        assert_eq!(text, full[..cut]);
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn eog_token_stops_with_stop_reason() {
        let (tx, h, _m, _log, codec) = start(1, 64, 8);
        // The fake emits its end-of-generation token 4 tokens after a '!'.
        let (rx, _c) = submit(&tx, &codec, "hi!", 50, &[]);
        let (text, finish, n, _) = collect(rx);
        assert_eq!(finish, Some(FinishReason::Stop));
        assert_eq!(n, 4);
        assert_eq!(text.len(), 4);
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn context_end_finishes_with_length() {
        let (tx, h, _m, _log, codec) = start(1, 16, 8);
        let (rx, _c) = submit(&tx, &codec, "0123456789", 100, &[]);
        let (_, finish, n, _) = collect(rx);
        assert_eq!(finish, Some(FinishReason::Length));
        // BOS + 10 prompt tokens; generation stops when prompt + generated fill the 16-cell
        // context, never past it.
        assert_eq!(n, 16 - 11);
        drop(tx);
        h.join().unwrap();
    }

    /// Generates `max_tokens` with the fake model as a context-shifting scheduler must: whenever the
    /// next token would not fit `n_ctx`, drop `n_discard` (default half) after `n_keep` (+ BOS).
    fn expected_with_shift(
        codec: &FakeCodec,
        prompt: &str,
        max_tokens: usize,
        n_ctx: usize,
        n_keep: usize,
        n_discard: usize,
    ) -> (String, usize) {
        let mut seq = codec.encode(prompt, true, false);
        let mut out = Vec::new();
        let mut shifts = 0;
        while out.len() < max_tokens {
            let t = next_token(&seq);
            out.push(t as u8);
            if out.len() == max_tokens {
                break;
            }
            if seq.len() + 1 >= n_ctx {
                let keep = (n_keep + 1).min(n_ctx - 4);
                let left = seq.len() - keep;
                let d = if n_discard > 0 { n_discard } else { left / 2 }.min(left - 1);
                seq.drain(keep..keep + d);
                shifts += 1;
            }
            seq.push(t);
        }
        (String::from_utf8(out).unwrap(), shifts)
    }

    /// With `--context-shift`, a generation runs past the slot's context (here 3× its 16 cells), each
    /// token following the shifted sequence, and reports `truncated`; `n_keep`/`n_discard` are obeyed.
    /// A compute that cannot shift falls back to stopping at the context's end.
    #[test]
    fn context_shift_generates_past_n_ctx() {
        for (n_keep, n_discard, can_shift) in [(0, 0, true), (3, 2, true), (0, 0, false)] {
            let codec = Arc::new(FakeCodec::default());
            let mut compute = FakeCompute::new(1, 16, FakeLog::default());
            if !can_shift {
                compute = compute.without_shift();
            }
            let cfg = SchedulerConfig {
                n_slots: 1,
                n_ctx_seq: 16,
                n_batch: 8,
                ctx_shift: true,
            };
            let (tx, h) = spawn(codec.clone(), Box::new(compute), cfg, Arc::default()).unwrap();
            let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
            let mut req = GenerateRequest::new(
                codec.encode("0123456789", true, false),
                48,
                greedy(),
                etx,
                CancellationToken::new(),
            );
            req.n_keep = n_keep;
            req.n_discard = n_discard;
            tx.send(Command::Generate(Box::new(req))).unwrap();
            let mut text = String::new();
            let (finish, n, truncated, used) = loop {
                match erx.blocking_recv().expect("events end with Done") {
                    GenEvent::Delta { text: t, .. } => text.push_str(&t),
                    GenEvent::Done {
                        finish,
                        n_generated,
                        truncated,
                        n_ctx_used,
                        ..
                    } => break (finish, n_generated, truncated, n_ctx_used),
                    GenEvent::Failed(m) => panic!("failed: {m}"),
                }
            };
            assert!(truncated, "the context's end was reached");
            assert!(used < 16, "the cache never holds more than the context");
            if can_shift {
                let (want, shifts) =
                    expected_with_shift(&codec, "0123456789", 48, 16, n_keep as usize, n_discard);
                assert!(shifts >= 3, "{shifts} shifts");
                assert_eq!((finish, n), (FinishReason::Length, 48));
                assert_eq!(text, want, "n_keep {n_keep} n_discard {n_discard}");
            } else {
                assert_eq!((finish, n), (FinishReason::Length, 16 - 11));
                assert_eq!(text, codec.expected("0123456789", 5));
            }
            drop(tx);
            h.join().unwrap();
        }
    }

    #[test]
    fn cancelled_request_frees_slot_for_queued_one() {
        let (tx, h, m, _log, codec) = start(1, 4096, 8);
        let (mut rx_a, cancel_a) = submit(&tx, &codec, "long one", 4000, &[]);
        // Wait until A is generating.
        match rx_a.blocking_recv() {
            Some(GenEvent::Delta { .. }) => {}
            other => panic!("{other:?}"),
        }
        let (rx_b, _cb) = submit(&tx, &codec, "second", 3, &[]);
        cancel_a.cancel();
        let (text, finish, _, _) = collect(rx_b);
        assert_eq!(finish, Some(FinishReason::Length));
        assert_eq!(text, codec.expected("second", 3));
        assert_eq!(m.requests_cancelled.load(Relaxed), 1);
        assert_eq!(m.queue_stall_steps.load(Relaxed), 0);
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn dropped_receiver_counts_as_cancellation() {
        let (tx, h, m, _log, codec) = start(1, 4096, 8);
        let (rx_a, _ca) = submit(&tx, &codec, "long one", 4000, &[]);
        drop(rx_a);
        let (rx_b, _cb) = submit(&tx, &codec, "second", 2, &[]);
        let (_, finish, _, _) = collect(rx_b);
        assert_eq!(finish, Some(FinishReason::Length));
        assert_eq!(m.requests_cancelled.load(Relaxed), 1);
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn prefix_is_reused_and_output_unchanged() {
        let (tx, h, m, _log, codec) = start(1, 256, 4);
        let (rx, _c) = submit(&tx, &codec, "shared prefix one", 3, &[]);
        let first = collect(rx).0;
        let (rx, _c) = submit(&tx, &codec, "shared prefix one", 3, &[]);
        let again = collect(rx).0;
        assert_eq!(first, again);
        let (rx, _c) = submit(&tx, &codec, "shared prefix two", 3, &[]);
        let other = collect(rx).0;
        assert_eq!(other, codec.expected("shared prefix two", 3));
        // The fake supports truncation: the second request reused all but the last prompt token, the
        // third the common "<bos>shared prefix " part.
        let cached = m.prompt_tokens_cached.load(Relaxed);
        assert_eq!(cached, 17 + 15);
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn joining_prompt_shares_the_forward_pass_of_a_generating_slot() {
        // A slow fake (1 ms per pass), so that A is still generating when B arrives.
        let codec = Arc::new(FakeCodec::default());
        let log = FakeLog::default();
        let compute = FakeCompute::new(2, 4096, log.clone())
            .with_step_delay(std::time::Duration::from_millis(1));
        let cfg = SchedulerConfig {
            n_slots: 2,
            n_ctx_seq: 4096,
            n_batch: 64,
            ctx_shift: false,
        };
        let (tx, h) = spawn(
            codec.clone(),
            Box::new(compute),
            cfg,
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let (mut rx_a, cancel_a) = submit(&tx, &codec, "long one", 4000, &[]);
        match rx_a.blocking_recv() {
            Some(GenEvent::Delta { .. }) => {}
            other => panic!("{other:?}"),
        }
        let prompt = "a longer prompt here";
        let (rx_b, _cb) = submit(&tx, &codec, prompt, 3, &[]);
        let (text, ..) = collect(rx_b);
        assert_eq!(text, codec.expected(prompt, 3));
        cancel_a.cancel();
        // One forward pass held A's next token and all of B's prompt (BOS + 20 bytes): no separate pass.
        let n_b = prompt.len() + 1;
        assert!(log.decodes().contains(&(2, 1 + n_b)), "{:?}", log.decodes());
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn slot_choice_follows_prefix_similarity_then_lru() {
        let slot = |id: u32, cache: Vec<u32>, last_used: u64| Slot {
            id,
            state: SlotState::Idle,
            cache,
            job: None,
            last_used,
            last: None,
        };
        let long: Vec<u32> = (0..100).collect();
        let mut slots = vec![
            slot(0, vec![7, 8, 9], 3),
            slot(1, long.clone(), 2),
            slot(2, Vec::new(), 0),
        ];
        // The slot whose cache the prompt continues.
        let mut p = long[..60].to_vec();
        p.push(1000);
        assert_eq!(pick_slot(&slots, &p), Some(1));
        // Sharing 5 of 100 cached tokens is under the similarity: the never-used slot is taken.
        assert_eq!(pick_slot(&slots, &long[..5]), Some(2));
        // No shared prefix: least recently used (the empty slot, then slot 1).
        assert_eq!(pick_slot(&slots, &[42]), Some(2));
        slots[2].last_used = 4;
        assert_eq!(pick_slot(&slots, &[42]), Some(1));
        // The longest shared prefix wins among similar slots.
        slots[0].cache = long[..50].to_vec();
        assert_eq!(pick_slot(&slots, &p), Some(1));
        slots[1].job = None;
        slots[1].cache = long[..20].to_vec();
        assert_eq!(pick_slot(&slots, &p), Some(0));
        // A busy slot is never chosen, however much it shares.
        let (etx, _erx) = tokio::sync::mpsc::unbounded_channel();
        let compute = FakeCompute::new(1, 8, FakeLog::default());
        slots[0].job = Some(Job {
            req: GenerateRequest {
                prompt: vec![1],
                max_tokens: 1,
                sampling: greedy(),
                stops: Vec::new(),
                n_probs: None,
                constraint: None,
                events: etx,
                cancel: CancellationToken::new(),
                id_slot: None,
                cache_prompt: true,
                post_sampling_probs: false,
                settings: None,
                n_keep: 0,
                n_discard: 0,
            },
            n_done: 0,
            n_cached: 0,
            history: Vec::new(),
            n_generated: 0,
            pending: None,
            sampler: compute.sampler(&greedy()),
            text: TextAssembler::new(Vec::new()),
            truncated: false,
            admitted: 1,
            constraint: None,
            mask: None,
            forced: VecDeque::new(),
            closing: false,
            t_admit: Instant::now(),
            t_first: None,
            generated: String::new(),
        });
        assert_eq!(pick_slot(&slots, &p), Some(1));
        assert_eq!(pick_slot(&slots[..1], &p), None, "the only slot is busy");
    }

    fn submit_with(
        tx: &mpsc::Sender<Command>,
        codec: &FakeCodec,
        prompt: &str,
        max_tokens: usize,
        constraint: Option<Constraint>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<GenEvent> {
        let (etx, erx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(Command::Generate(Box::new(GenerateRequest {
            prompt: codec.encode(prompt, true, false),
            max_tokens,
            sampling: greedy(),
            stops: Vec::new(),
            n_probs: Some(2),
            constraint,
            events: etx,
            cancel: CancellationToken::new(),
            id_slot: None,
            cache_prompt: true,
            post_sampling_probs: false,
            settings: None,
            n_keep: 0,
            n_discard: 0,
        })))
        .unwrap();
        erx
    }

    fn grammar(codec: &FakeCodec, spec: GrammarSpec) -> Constraint {
        codec.grammar_compiler().unwrap().compile(&spec).unwrap()
    }

    #[test]
    fn constrained_slot_follows_its_grammar_and_stops_when_complete() {
        let (tx, h, _m, _log, codec) = start(1, 256, 8);
        // The fake model writes letters; the grammar allows three digits and then only EOS. Greedy on
        // the masked logits (all allowed ones equal) takes the lowest id: '0'.
        let c = grammar(&codec, GrammarSpec::Regex("[0-9]{3}".into()));
        let rx = submit_with(&tx, &codec, "abc", 50, Some(c));
        let (text, finish, n, _) = collect(rx);
        assert_eq!(text, "000");
        assert_eq!(finish, Some(FinishReason::Stop));
        assert_eq!(n, 3);
        // Where the model's own choice is allowed, it is kept: a grammar of any lowercase letters gives
        // the unconstrained answer, up to max_tokens.
        let c = grammar(&codec, GrammarSpec::Lark("start: /[a-z]*/".into()));
        let rx = submit_with(&tx, &codec, "abc", 7, Some(c));
        let (text, finish, ..) = collect(rx);
        assert_eq!(text, codec.expected("abc", 7));
        assert_eq!(finish, Some(FinishReason::Length));
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn constrained_and_free_slots_share_passes_and_free_ones_are_unchanged() {
        let (tx, h, _m, log, codec) = start(4, 256, 64);
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"a": {"type": "boolean"}},
            "required": ["a"],
            "additionalProperties": false
        });
        let spec = GrammarSpec::JsonSchema {
            schema,
            strict: true,
        };
        let mut rxs = Vec::new();
        for (k, p) in ["one", "two", "three", "four"].iter().enumerate() {
            let c = (k % 2 == 0).then(|| grammar(&codec, spec.clone()));
            rxs.push((k, *p, submit_with(&tx, &codec, p, 200, c)));
        }
        for (k, p, rx) in rxs {
            let (text, finish, ..) = collect(rx);
            if k % 2 == 0 {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert!(v["a"].is_boolean(), "{text}");
                assert_eq!(finish, Some(FinishReason::Stop));
            } else {
                assert_eq!(text, codec.expected(p, 200), "free slot {p}");
                assert_eq!(finish, Some(FinishReason::Length));
            }
        }
        assert_eq!(log.max_seqs_per_decode(), 4);
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn a_json_reply_is_closed_before_max_tokens_or_the_context_cuts_it() {
        // The fake model under json_object writes whitespace and strings of spaces that never end (the
        // lowest allowed ids), so only the closing can end the object in time.
        let (tx, h, _m, _log, codec) = start(1, 64, 8);
        for max_tokens in [3, 10, 40] {
            let c = grammar(&codec, GrammarSpec::JsonObject);
            let (text, finish, n, n_tok) =
                collect(submit_with(&tx, &codec, "abc", max_tokens, Some(c)));
            let v: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("max_tokens {max_tokens}: {text:?}: {e}"));
            assert!(v.is_object(), "{text:?}");
            assert_eq!(finish, Some(FinishReason::Length), "the budget ended it");
            assert!(
                n <= max_tokens && n == n_tok,
                "{n} tokens within {max_tokens}"
            );
        }
        // The end of the slot's context (64 cells, a 4-token prompt) closes it the same way.
        let c = grammar(&codec, GrammarSpec::JsonObject.for_chat_reply());
        let (text, finish, n, _) = collect(submit_with(&tx, &codec, "abc", 1000, Some(c)));
        assert!(
            serde_json::from_str::<serde_json::Value>(text.trim()).is_ok(),
            "{text:?}"
        );
        assert_eq!(finish, Some(FinishReason::Length));
        assert!(n < 64, "{n}");
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn matcher_error_fails_only_that_request() {
        let (tx, h, _m, _log, codec) = start(2, 256, 8);
        let mut broken = grammar(&codec, GrammarSpec::JsonObject);
        // Committing a token the grammar refuses leaves the matcher in its error state.
        assert!(broken.commit(u32::from(b'x')).is_err());
        let rx_bad = submit_with(&tx, &codec, "abc", 5, Some(broken));
        let rx_ok = submit_with(&tx, &codec, "abc", 5, None);
        let mut rx_bad = rx_bad;
        match rx_bad.blocking_recv() {
            Some(GenEvent::Failed(m)) => assert!(m.starts_with("grammar matcher: "), "{m}"),
            other => panic!("{other:?}"),
        }
        let (text, ..) = collect(rx_ok);
        assert_eq!(text, codec.expected("abc", 5));
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn long_prompt_is_prefilled_in_chunks() {
        let (tx, h, _m, log, codec) = start(1, 256, 4);
        let (rx, _c) = submit(&tx, &codec, "0123456789", 2, &[]);
        let (text, ..) = collect(rx);
        assert_eq!(text, codec.expected("0123456789", 2));
        assert!(log.max_tokens_per_decode() <= 4);
        drop(tx);
        h.join().unwrap();
    }

    #[test]
    fn shutdown_fails_queued_and_active() {
        let (tx, h, _m, _log, codec) = start(1, 4096, 8);
        let (mut rx_a, _ca) = submit(&tx, &codec, "a", 4000, &[]);
        let (mut rx_b, _cb) = submit(&tx, &codec, "b", 4000, &[]);
        tx.send(Command::Shutdown).unwrap();
        h.join().unwrap();
        let mut last = None;
        while let Ok(e) = rx_a.try_recv() {
            last = Some(e);
        }
        assert!(matches!(last, Some(GenEvent::Failed(_))), "{last:?}");
        assert!(matches!(rx_b.try_recv(), Ok(GenEvent::Failed(_))));
    }

    fn slot_action(
        tx: &mpsc::Sender<Command>,
        id_slot: usize,
        action: SlotAction,
    ) -> oneshot::Receiver<Result<(SlotActionDone, Duration), BackendError>> {
        let (reply, rx) = oneshot::channel();
        tx.send(Command::SlotAction(SlotActionRequest {
            id_slot,
            action,
            reply,
        }))
        .unwrap();
        rx
    }

    fn submit_on(
        tx: &mpsc::Sender<Command>,
        codec: &FakeCodec,
        prompt: &str,
        max_tokens: usize,
        id_slot: usize,
    ) -> (String, usize) {
        let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
        let mut req = GenerateRequest::new(
            codec.encode(prompt, true, false),
            max_tokens,
            greedy(),
            etx,
            CancellationToken::new(),
        );
        req.id_slot = Some(id_slot);
        tx.send(Command::Generate(Box::new(req))).unwrap();
        let mut text = String::new();
        loop {
            match erx.blocking_recv().expect("events end with Done") {
                GenEvent::Delta { text: t, .. } => text.push_str(&t),
                GenEvent::Done { n_cached, .. } => return (text, n_cached),
                GenEvent::Failed(m) => panic!("failed: {m}"),
            }
        }
    }

    /// A slot saved, restored into another slot, reused there by the next request (its prompt tokens
    /// come from the cache and the answer is unchanged), then erased.
    #[test]
    fn a_saved_slot_restores_into_another_and_its_prefix_is_reused() {
        let (tx, h, _m, _log, codec) = start(2, 256, 8);
        let prompt = "a prompt worth keeping";
        let (first, cached) = submit_on(&tx, &codec, prompt, 5, 0);
        assert_eq!(
            (first.as_str(), cached),
            (codec.expected(prompt, 5).as_str(), 0)
        );
        let Ok((SlotActionDone::Saved { bytes, n_tokens }, _)) =
            slot_action(&tx, 0, SlotAction::Save)
                .blocking_recv()
                .unwrap()
        else {
            panic!("save failed")
        };
        // BOS + prompt + the generated tokens but the last (sampled, never evaluated).
        assert_eq!(n_tokens, 1 + prompt.len() + 4);
        match slot_action(&tx, 1, SlotAction::Restore(bytes.clone())).blocking_recv() {
            Ok(Ok((SlotActionDone::Restored(n), _))) => assert_eq!(n, n_tokens),
            other => panic!("{other:?}"),
        }
        let (again, cached) = submit_on(&tx, &codec, prompt, 5, 1);
        assert_eq!(again, first);
        assert_eq!(
            cached,
            1 + prompt.len() - 1,
            "all but the last prompt token reused"
        );
        // A refused file leaves the slot as it was: its cache is still reused.
        match slot_action(&tx, 1, SlotAction::Restore(b"junk".to_vec())).blocking_recv() {
            Ok(Err(BackendError::SlotFile(m))) => assert!(m.contains("not a fake slot file")),
            other => panic!("{other:?}"),
        }
        let (_, cached) = submit_on(&tx, &codec, prompt, 5, 1);
        assert_eq!(cached, prompt.len());
        match slot_action(&tx, 1, SlotAction::Erase).blocking_recv() {
            Ok(Ok((SlotActionDone::Erased(n), _))) => assert_eq!(n, n_tokens),
            other => panic!("{other:?}"),
        }
        let (_, cached) = submit_on(&tx, &codec, prompt, 5, 1);
        assert_eq!(cached, 0, "erased");
        match slot_action(&tx, 1, SlotAction::Erase).blocking_recv() {
            Ok(Ok((SlotActionDone::Erased(n), _))) => assert_eq!(n, n_tokens),
            other => panic!("{other:?}"),
        }
        match slot_action(&tx, 1, SlotAction::Erase).blocking_recv() {
            Ok(Ok((SlotActionDone::Erased(0), _))) => {}
            other => panic!("{other:?}"),
        }
        drop(tx);
        h.join().unwrap();
    }

    /// An action on a slot that is processing a request waits until the request ends (llama-server
    /// defers it), while actions on idle slots run at once.
    #[test]
    fn an_action_on_a_busy_slot_waits_for_its_request() {
        let (tx, h, _m, _log, codec) =
            start_with_step_delay(2, 4096, 8, std::time::Duration::from_millis(1));
        let (mut rx, cancel) = submit(&tx, &codec, "long one", 4000, &[]);
        match rx.blocking_recv() {
            Some(GenEvent::Delta { .. }) => {}
            other => panic!("{other:?}"),
        }
        let mut busy = slot_action(&tx, 0, SlotAction::Save);
        // Slot 1 is idle: its erase answers while slot 0 still generates.
        match slot_action(&tx, 1, SlotAction::Erase).blocking_recv() {
            Ok(Ok((SlotActionDone::Erased(0), _))) => {}
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(busy.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "the save waits for slot 0"
        );
        cancel.cancel();
        match busy.blocking_recv() {
            Ok(Ok((SlotActionDone::Saved { n_tokens, .. }, _))) => {
                assert!(n_tokens > 9, "{n_tokens}")
            }
            other => panic!("{other:?}"),
        }
        drop(tx);
        h.join().unwrap();
    }
}
