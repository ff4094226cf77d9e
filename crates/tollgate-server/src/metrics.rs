//! Prometheus metrics, served as text at `GET /metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::hash::BuildHasher;

type Labels = Vec<(&'static str, String)>;

/// Store faults by kind, for the whole process: they are counted where a database or disk error
/// is classified ([`crate::error::Error::store_unavailable`]), far from any `Metrics` handle.
static STORE_FAULTS: std::sync::LazyLock<Family<Labels, Counter>> =
    std::sync::LazyLock::new(Family::default);

/// Counts one transient fault of the store (`tollgate_store_faults_total{kind}`).
pub fn count_store_fault(fault: crate::error::StoreFault) {
    STORE_FAULTS
        .get_or_create(&vec![("kind", fault.as_str().to_owned())])
        .inc();
}

/// The metric handles of one (route, method, status).
struct RequestHandles {
    route: String,
    method: String,
    status: u16,
    count: Counter,
    latency: Histogram,
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    http_requests: Family<Labels, Counter>,
    http_duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub rate_limited: Counter,
    pub credits_charged: Counter,
    pub credits_refunded: Counter,
    pub credits_purchased: Counter,
    pub queue_depth: Gauge,
    /// 1 while `/readyz` would answer 200, as of its last probe.
    pub ready: Gauge,
    pub task_duration: Histogram,
    tasks_finished: Family<Labels, Counter>,
    model_runs: Family<Labels, Counter>,
    model_failing: Family<Labels, Gauge>,
    request_handles: dashmap::DashMap<u64, RequestHandles, crate::domain::caches::FastHash>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let http_requests = Family::<Labels, Counter>::default();
        let http_duration =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let rate_limited = Counter::default();
        let credits_charged = Counter::default();
        let credits_refunded = Counter::default();
        let credits_purchased = Counter::default();
        let queue_depth = Gauge::default();
        let ready = Gauge::default();
        let task_duration = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let tasks_finished = Family::<Labels, Counter>::default();
        let model_runs = Family::<Labels, Counter>::default();
        let model_failing = Family::<Labels, Gauge>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            http_duration.clone(),
        );
        registry.register(
            "rate_limit_rejections",
            "Requests refused with 429",
            rate_limited.clone(),
        );
        registry.register(
            "credits_charged",
            "Credits charged for accepted tasks",
            credits_charged.clone(),
        );
        registry.register(
            "credits_refunded",
            "Credits refunded for failed or cancelled tasks",
            credits_refunded.clone(),
        );
        registry.register(
            "credits_purchased",
            "Credits bought through Stripe Checkout",
            credits_purchased.clone(),
        );
        registry.register(
            "task_queue_depth",
            "Tasks waiting to run",
            queue_depth.clone(),
        );
        registry.register(
            "ready",
            "1 while the store can commit a write (and Redis answers, when configured), as of the last probe",
            ready.clone(),
        );
        // Every kind at zero from the start, so a rate over it exists before the first fault.
        for fault in crate::error::StoreFault::ALL {
            drop(STORE_FAULTS.get_or_create(&vec![("kind", fault.as_str().to_owned())]));
        }
        registry.register(
            "store_faults",
            "Requests and jobs stopped by a transient fault of the store (database or disk), by kind",
            STORE_FAULTS.clone(),
        );
        registry.register(
            "task_duration_seconds",
            "Time from start to end of a task run",
            task_duration.clone(),
        );
        registry.register(
            "tasks_finished",
            "Tasks that reached a final state, by status",
            tasks_finished.clone(),
        );
        registry.register(
            "model_runs",
            "Runs of each model's backend, by outcome (succeeded, failed: the provider refused, \
             was unavailable or timed out)",
            model_runs.clone(),
        );
        registry.register(
            "model_failing",
            "1 while a model's provider keeps failing (its last runs all failed)",
            model_failing.clone(),
        );
        Metrics {
            registry,
            model_runs,
            model_failing,
            http_requests,
            http_duration,
            rate_limited,
            credits_charged,
            credits_refunded,
            credits_purchased,
            queue_depth,
            ready,
            task_duration,
            tasks_finished,
            request_handles: dashmap::DashMap::default(),
        }
    }
}

impl Metrics {
    pub fn observe_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        // The label sets of a route are few and fixed; finding them must not allocate on every
        // request, so the metric handles are kept by a hash of the labels (checked in full).
        let slot = foldhash::fast::FixedState::with_seed(0).hash_one((route, method, status));
        if let Some(found) = self.request_handles.get(&slot) {
            if found.route == route && found.method == method && found.status == status {
                found.count.inc();
                found.latency.observe(seconds);
                return;
            }
        }
        let count = self
            .http_requests
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("method", method.to_owned()),
                ("status", status.to_string()),
            ])
            .clone();
        let latency = self
            .http_duration
            .get_or_create(&vec![("route", route.to_owned())])
            .clone();
        count.inc();
        latency.observe(seconds);
        self.request_handles.insert(
            slot,
            RequestHandles {
                route: route.to_owned(),
                method: method.to_owned(),
                status,
                count,
                latency,
            },
        );
    }

    /// The models served, each at zero from the start, so that a rate over its runs exists
    /// before the first (and only these: a model no longer sold is not shown).
    pub fn models(&self, ids: impl IntoIterator<Item = String>) {
        self.model_runs.clear();
        self.model_failing.clear();
        for id in ids {
            for outcome in ["succeeded", "failed"] {
                drop(self.model_runs.get_or_create(&vec![
                    ("model", id.clone()),
                    ("outcome", outcome.to_owned()),
                ]));
            }
            self.model_failing
                .get_or_create(&vec![("model", id)])
                .set(0);
        }
    }

    /// One run of `model`'s backend ended; `failing`: the model is now reported failing.
    pub fn model_run(&self, model: &str, succeeded: bool, failing: bool) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.model_runs
            .get_or_create(&vec![
                ("model", model.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
        self.model_failing
            .get_or_create(&vec![("model", model.to_owned())])
            .set(i64::from(failing));
    }

    pub fn task_finished(&self, status: &str) {
        self.tasks_finished
            .get_or_create(&vec![("status", status.to_owned())])
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
