//! Prometheus metrics of the supervisor (`GET /metrics`): loaded models, loads, evictions, crashes,
//! requests by model and status, and a histogram of the proxy's added latency (time to response headers).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Counters; all methods are cheap and lock-light.
#[derive(Default)]
pub struct Metrics {
    pub loads: AtomicU64,
    pub load_failures: AtomicU64,
    pub evictions: AtomicU64,
    pub crashes: AtomicU64,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<Histogram>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    /// Counts one finished request for `model` with HTTP `status`.
    pub fn request(&self, model: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((model.to_owned(), status)).or_default() += 1;
    }

    /// Records the time (seconds) from receiving a request to sending the response headers, for requests
    /// to a model that was already loaded.
    pub fn observe_latency(&self, secs: f64) {
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// The Prometheus text exposition; `loaded` is the number of models with a worker process.
    pub fn render(&self, loaded: usize) -> String {
        let mut s = String::new();
        let c = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let _ = writeln!(
            s,
            "# HELP cyber_inference_models_loaded Models with a worker process.\n# TYPE cyber_inference_models_loaded gauge\ncyber_inference_models_loaded {loaded}"
        );
        c(
            &mut s,
            "cyber_inference_model_loads_total",
            "Workers that became ready.",
            self.loads.load(Ordering::Relaxed),
        );
        c(
            &mut s,
            "cyber_inference_model_load_failures_total",
            "Workers that failed to load.",
            self.load_failures.load(Ordering::Relaxed),
        );
        c(
            &mut s,
            "cyber_inference_model_evictions_total",
            "Workers unloaded (idle, LRU or on request).",
            self.evictions.load(Ordering::Relaxed),
        );
        c(
            &mut s,
            "cyber_inference_worker_crashes_total",
            "Ready workers that exited unexpectedly.",
            self.crashes.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            s,
            "# HELP cyber_inference_requests_total Proxied requests by model and status.\n# TYPE cyber_inference_requests_total counter"
        );
        for ((model, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let model = model
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(
                s,
                "cyber_inference_requests_total{{model=\"{model}\",status=\"{status}\"}} {n}"
            );
        }
        let h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            s,
            "# HELP cyber_inference_proxy_latency_seconds Time from request to upstream response headers.\n# TYPE cyber_inference_proxy_latency_seconds histogram"
        );
        for (b, n) in LATENCY_BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(
                s,
                "cyber_inference_proxy_latency_seconds_bucket{{le=\"{b}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "cyber_inference_proxy_latency_seconds_bucket{{le=\"+Inf\"}} {}\ncyber_inference_proxy_latency_seconds_sum {}\ncyber_inference_proxy_latency_seconds_count {}",
            h.count, h.sum, h.count
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.loads.fetch_add(2, Ordering::Relaxed);
        m.request("a\"b", 200);
        m.request("a\"b", 200);
        m.request("c", 502);
        m.observe_latency(0.0007);
        m.observe_latency(0.3);
        let t = m.render(1);
        assert!(t.contains("cyber_inference_models_loaded 1"), "{t}");
        assert!(t.contains("cyber_inference_model_loads_total 2"));
        assert!(t.contains("cyber_inference_requests_total{model=\"a\\\"b\",status=\"200\"} 2"));
        assert!(t.contains("cyber_inference_requests_total{model=\"c\",status=\"502\"} 1"));
        assert!(t.contains("cyber_inference_proxy_latency_seconds_bucket{le=\"0.0005\"} 0"));
        assert!(t.contains("cyber_inference_proxy_latency_seconds_bucket{le=\"0.001\"} 1"));
        assert!(t.contains("cyber_inference_proxy_latency_seconds_bucket{le=\"0.5\"} 2"));
        assert!(t.contains("cyber_inference_proxy_latency_seconds_count 2"));
    }
}
