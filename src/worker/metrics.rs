//! Counters and gauges the scheduler and the HTTP layer update, rendered as Prometheus text on `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The HTTP endpoints counted in `requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
    /// `/v1/embeddings`.
    Embeddings,
    /// `/tokenize`.
    Tokenize,
    /// `/detokenize`.
    Detokenize,
}

const ENDPOINTS: [(Endpoint, &str); 5] = [
    (Endpoint::Chat, "chat_completions"),
    (Endpoint::Completions, "completions"),
    (Endpoint::Embeddings, "embeddings"),
    (Endpoint::Tokenize, "tokenize"),
    (Endpoint::Detokenize, "detokenize"),
];

/// All metrics of one worker. Counters only grow; gauges are set by the scheduler once per step.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; 5],
    /// Requests answered with an error status.
    pub requests_failed: AtomicU64,
    /// Generation requests whose client went away before the end.
    pub requests_cancelled: AtomicU64,
    /// Prompt tokens evaluated (cached prefix tokens not included).
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens reused from a slot's KV cache.
    pub prompt_tokens_cached: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Forward passes run by the scheduler.
    pub decode_steps: AtomicU64,
    /// Nanoseconds spent in forward passes that held only prompt tokens.
    pub prompt_nanos: AtomicU64,
    /// Nanoseconds spent in forward passes that generated at least one token.
    pub generation_nanos: AtomicU64,
    /// Scheduler steps that ended with a request queued while a slot was free (should stay 0).
    pub queue_stall_steps: AtomicU64,
    /// Slots holding a request (gauge).
    pub slots_busy: AtomicU64,
    /// Slots in all (gauge).
    pub slots_total: AtomicU64,
    /// Requests waiting for a slot (gauge).
    pub queue_length: AtomicU64,
    /// Repeating layers of the model that run on a GPU (gauge, set once at load; 0 on the CPU).
    pub gpu_layers: AtomicU64,
}

impl Metrics {
    /// Counts one request to `endpoint`.
    pub fn count_request(&self, endpoint: Endpoint) {
        let i = ENDPOINTS
            .iter()
            .position(|(e, _)| *e == endpoint)
            .unwrap_or(0);
        self.requests[i].fetch_add(1, Relaxed);
    }

    /// Adds the duration of a forward pass to the prompt or generation time.
    pub fn add_step_time(&self, d: Duration, generated: bool) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if generated {
            self.generation_nanos.fetch_add(ns, Relaxed);
        } else {
            self.prompt_nanos.fetch_add(ns, Relaxed);
        }
        self.decode_steps.fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition of every metric (names prefixed `cyber_inference_`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP cyber_inference_{name} {help}");
            let _ = writeln!(out, "# TYPE cyber_inference_{name} {kind}");
            let _ = writeln!(out, "cyber_inference_{name} {value}");
        };
        let g = |a: &AtomicU64| a.load(Relaxed).to_string();
        let prompt_s = self.prompt_nanos.load(Relaxed) as f64 / 1e9;
        let gen_s = self.generation_nanos.load(Relaxed) as f64 / 1e9;
        let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        metric(
            "requests_failed_total",
            "counter",
            "Requests answered with an error.",
            g(&self.requests_failed),
        );
        metric(
            "requests_cancelled_total",
            "counter",
            "Generations stopped because the client went away.",
            g(&self.requests_cancelled),
        );
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens evaluated.",
            g(&self.prompt_tokens),
        );
        metric(
            "prompt_tokens_cached_total",
            "counter",
            "Prompt tokens reused from a slot's KV cache.",
            g(&self.prompt_tokens_cached),
        );
        metric(
            "generated_tokens_total",
            "counter",
            "Tokens generated.",
            g(&self.generated_tokens),
        );
        metric(
            "decode_steps_total",
            "counter",
            "Batched forward passes.",
            g(&self.decode_steps),
        );
        metric(
            "prompt_seconds_total",
            "counter",
            "Seconds in prompt-only forward passes.",
            format!("{prompt_s}"),
        );
        metric(
            "generation_seconds_total",
            "counter",
            "Seconds in forward passes that generated tokens.",
            format!("{gen_s}"),
        );
        metric(
            "prompt_tokens_per_second",
            "gauge",
            "Prompt tokens per second of prompt-only forward passes.",
            format!("{}", rate(self.prompt_tokens.load(Relaxed), prompt_s)),
        );
        metric(
            "generation_tokens_per_second",
            "gauge",
            "Generated tokens per second of generating forward passes (all slots together).",
            format!("{}", rate(self.generated_tokens.load(Relaxed), gen_s)),
        );
        metric(
            "queue_stall_steps_total",
            "counter",
            "Scheduler steps that ended with a queued request while a slot was free.",
            g(&self.queue_stall_steps),
        );
        metric(
            "slots_busy",
            "gauge",
            "Slots holding a request.",
            g(&self.slots_busy),
        );
        metric("slots_total", "gauge", "Slots.", g(&self.slots_total));
        metric(
            "queue_length",
            "gauge",
            "Requests waiting for a free slot.",
            g(&self.queue_length),
        );
        metric(
            "gpu_layers",
            "gauge",
            "Repeating layers of the model that run on a GPU.",
            g(&self.gpu_layers),
        );
        let _ = writeln!(
            out,
            "# HELP cyber_inference_requests_total HTTP requests by endpoint."
        );
        let _ = writeln!(out, "# TYPE cyber_inference_requests_total counter");
        for (i, (_, name)) in ENDPOINTS.iter().enumerate() {
            let _ = writeln!(
                out,
                "cyber_inference_requests_total{{endpoint=\"{name}\"}} {}",
                self.requests[i].load(Relaxed)
            );
        }
        self.render_llamacpp(&mut out);
        out
    }

    /// The same measurements under llama-server's `llamacpp:*` names
    /// (`server_task_result_metrics::to_metrics`), so dashboards made for llama-server read them.
    fn render_llamacpp(&self, out: &mut String) {
        let g = |a: &AtomicU64| a.load(Relaxed) as f64;
        let prompt_s = self.prompt_nanos.load(Relaxed) as f64 / 1e9;
        let gen_s = self.generation_nanos.load(Relaxed) as f64 / 1e9;
        let rate = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };
        let items: [(&str, &str, &str, f64); 10] = [
            (
                "prompt_tokens_total",
                "counter",
                "Number of prompt tokens processed, excluding cached tokens",
                g(&self.prompt_tokens),
            ),
            (
                "prompt_tokens_cached_total",
                "counter",
                "Number of prompt tokens reused from the cache",
                g(&self.prompt_tokens_cached),
            ),
            (
                "prompt_seconds_total",
                "counter",
                "Total time spent processing prompts",
                prompt_s,
            ),
            (
                "tokens_predicted_total",
                "counter",
                "Number of generation tokens processed",
                g(&self.generated_tokens),
            ),
            (
                "tokens_predicted_seconds_total",
                "counter",
                "Total time spent generating tokens",
                gen_s,
            ),
            (
                "n_decode_total",
                "counter",
                "Total number of llama_decode() calls",
                g(&self.decode_steps),
            ),
            (
                "prompt_tokens_seconds",
                "gauge",
                "Average prompt throughput in tokens/s",
                rate(g(&self.prompt_tokens), prompt_s),
            ),
            (
                "predicted_tokens_seconds",
                "gauge",
                "Average generation throughput in tokens/s",
                rate(g(&self.generated_tokens), gen_s),
            ),
            (
                "requests_processing",
                "gauge",
                "Number of requests processing",
                g(&self.slots_busy),
            ),
            (
                "requests_deferred",
                "gauge",
                "Number of requests deferred",
                g(&self.queue_length),
            ),
        ];
        for (name, kind, help, value) in items {
            let _ = writeln!(out, "# HELP llamacpp:{name} {help}");
            let _ = writeln!(out, "# TYPE llamacpp:{name} {kind}");
            let _ = writeln!(out, "llamacpp:{name} {value}");
        }
    }
}

/// Reads one unlabelled sample `cyber_inference_{name}` from Prometheus text (for the unit tests).
#[cfg(test)]
pub(crate) fn sample(text: &str, name: &str) -> Option<f64> {
    let full = format!("cyber_inference_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&full))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text() {
        let m = Metrics::default();
        m.count_request(Endpoint::Chat);
        m.count_request(Endpoint::Chat);
        m.generated_tokens.store(10, Relaxed);
        m.add_step_time(Duration::from_millis(500), true);
        m.gpu_layers.store(30, Relaxed);
        let t = m.render();
        assert_eq!(sample(&t, "gpu_layers"), Some(30.0));
        assert!(t.contains("cyber_inference_requests_total{endpoint=\"chat_completions\"} 2"));
        assert_eq!(sample(&t, "generated_tokens_total"), Some(10.0));
        assert_eq!(sample(&t, "generation_tokens_per_second"), Some(20.0));
        assert_eq!(sample(&t, "decode_steps_total"), Some(1.0));
        assert!(t.contains("\nllamacpp:tokens_predicted_total 10\n"), "{t}");
        assert!(
            t.contains("\nllamacpp:predicted_tokens_seconds 20\n"),
            "{t}"
        );
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(
                name.starts_with("cyber_inference_") || name.starts_with("llamacpp:"),
                "{line}"
            );
            value.parse::<f64>().unwrap();
        }
    }
}
