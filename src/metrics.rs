//! Metrics in the Prometheus text format: counters, gauges and latency
//! histograms kept in a [`Registry`], rendered on demand, and served at
//! `/metrics` by [`serve`].
//!
//! A metric is found by its family name and labels, created on first use;
//! callers on hot paths keep the returned `Arc` and update it with one
//! atomic operation. Families keep the order they were first registered in,
//! so the output is stable.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Latency buckets in seconds, 100 µs to 10 s: a cached chunk is served in
/// well under a millisecond, an origin fetch in tens of milliseconds, and a
/// fetch deadline is ten seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A count that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }
    pub fn add(&self, delta: i64) {
        self.0.fetch_add(delta, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Observations counted into fixed buckets (upper bounds in seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus the overflow bucket; not cumulative.
    buckets: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = self.bounds.partition_point(|&bound| bound < seconds);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

#[derive(Debug, Clone)]
enum Metric {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

impl Metric {
    fn kind(&self) -> &'static str {
        match self {
            Metric::Counter(_) => "counter",
            Metric::Gauge(_) => "gauge",
            Metric::Histogram(_) => "histogram",
        }
    }
}

type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    series: BTreeMap<Labels, Metric>,
}

/// A set of metric families.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<Vec<Family>>,
    refreshers: Mutex<Vec<Refresher>>,
}

/// Copies values kept elsewhere into a registry just before it renders.
struct Refresher(Box<dyn Fn(&Registry) + Send + Sync>);

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Refresher")
    }
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// The counter `name{labels}`, created at 0 on first use.
    ///
    /// # Panics
    /// If `name` was registered as another kind: a programming error.
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Counter> {
        match self.series(name, help, labels, || Metric::Counter(Arc::default())) {
            Metric::Counter(counter) => counter,
            other => panic!("metric {name} is a {}, not a counter", other.kind()),
        }
    }

    /// The gauge `name{labels}`, created at 0 on first use.
    ///
    /// # Panics
    /// If `name` was registered as another kind: a programming error.
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Gauge> {
        match self.series(name, help, labels, || Metric::Gauge(Arc::default())) {
            Metric::Gauge(gauge) => gauge,
            other => panic!("metric {name} is a {}, not a gauge", other.kind()),
        }
    }

    /// The histogram `name{labels}` with `bounds` (seconds, ascending; see
    /// [`LATENCY_BUCKETS`]), created empty on first use.
    ///
    /// # Panics
    /// If `name` was registered as another kind: a programming error.
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        bounds: &'static [f64],
    ) -> Arc<Histogram> {
        let create = || Metric::Histogram(Arc::new(Histogram::new(bounds)));
        match self.series(name, help, labels, create) {
            Metric::Histogram(histogram) => histogram,
            other => panic!("metric {name} is a {}, not a histogram", other.kind()),
        }
    }

    fn series(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        create: impl FnOnce() -> Metric,
    ) -> Metric {
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let index = match families.iter().position(|f| f.name == name) {
            Some(index) => index,
            None => {
                families.push(Family {
                    name: name.to_owned(),
                    help: help.to_owned(),
                    series: BTreeMap::new(),
                });
                families.len() - 1
            }
        };
        families[index]
            .series
            .entry(labels)
            .or_insert_with(create)
            .clone()
    }

    /// Runs `refresh` before every render: for values another part keeps
    /// in its own counters (a device's engine), copied in only when scraped
    /// so that its hot path pays nothing. `refresh` must not call
    /// `on_render`.
    pub fn on_render(&self, refresh: impl Fn(&Registry) + Send + Sync + 'static) {
        self.refreshers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Refresher(Box::new(refresh)));
    }

    /// Every metric in the text exposition format.
    pub fn render(&self) -> String {
        for refresher in self
            .refreshers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            (refresher.0)(self);
        }
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for family in families.iter() {
            let Some(first) = family.series.values().next() else {
                continue;
            };
            let name = &family.name;
            let _ = writeln!(out, "# HELP {name} {}", escape(&family.help, false));
            let _ = writeln!(out, "# TYPE {name} {}", first.kind());
            for (labels, metric) in &family.series {
                match metric {
                    Metric::Counter(c) => {
                        let _ = writeln!(out, "{name}{} {}", label_text(labels, None), c.get());
                    }
                    Metric::Gauge(g) => {
                        let _ = writeln!(out, "{name}{} {}", label_text(labels, None), g.get());
                    }
                    Metric::Histogram(h) => render_histogram(&mut out, name, labels, h),
                }
            }
        }
        out
    }
}

fn render_histogram(out: &mut String, name: &str, labels: &Labels, h: &Histogram) {
    let mut cumulative = 0;
    for (i, bucket) in h.buckets.iter().enumerate() {
        cumulative += bucket.load(Ordering::Relaxed);
        let le = h.bounds.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
        let _ = writeln!(
            out,
            "{name}_bucket{} {cumulative}",
            label_text(labels, Some(&le))
        );
    }
    let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
    let _ = writeln!(out, "{name}_sum{} {sum}", label_text(labels, None));
    let _ = writeln!(out, "{name}_count{} {cumulative}", label_text(labels, None));
}

fn label_text(labels: &Labels, le: Option<&str>) -> String {
    let mut pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v, true)))
        .collect();
    if let Some(le) = le {
        pairs.push(format!("le=\"{le}\""));
    }
    if pairs.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", pairs.join(","))
    }
}

/// Escapes a label value (backslash, quote, newline) or help text
/// (backslash, newline), as the format asks.
fn escape(text: &str, quote: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

/// The `/metrics` response for `registry`.
pub fn response(registry: &Registry) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::from(registry.render())));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(CONTENT_TYPE),
    );
    response
}

/// Serves `registry` at `/metrics` on `addr` (HTTP/1.1) until the runtime
/// stops; other paths get 404. Returns the bound address (`addr` may ask
/// for port 0).
pub async fn serve(registry: Arc<Registry>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, most likely: retrying at once
                    // would spin; pause, then go on.
                    tracing::warn!(%error, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let registry = Arc::clone(&registry);
            let service = hyper::service::service_fn(move |request: http::Request<_>| {
                let response = if request.uri().path() == "/metrics" {
                    response(&registry)
                } else {
                    let mut not_found = http::Response::new(Full::new(Bytes::from_static(
                        b"not found: metrics are at /metrics\n",
                    )));
                    *not_found.status_mut() = http::StatusCode::NOT_FOUND;
                    not_found
                };
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let registry = Registry::new();
        registry
            .counter(
                "requests_total",
                "Requests.",
                &[("route", "get"), ("status", "200")],
            )
            .add(3);
        let same = registry.counter(
            "requests_total",
            "Requests.",
            &[("route", "get"), ("status", "200")],
        );
        same.inc();
        registry
            .gauge("open", "Open \"connections\".\nNow.", &[])
            .set(-2);
        let h = registry.histogram(
            "latency_seconds",
            "Latency.",
            &[("route", "a\"b")],
            &[0.001, 0.01],
        );
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let text = registry.render();
        let expected = "\
# HELP requests_total Requests.
# TYPE requests_total counter
requests_total{route=\"get\",status=\"200\"} 4
# HELP open Open \"connections\".\\nNow.
# TYPE open gauge
open -2
# HELP latency_seconds Latency.
# TYPE latency_seconds histogram
latency_seconds_bucket{route=\"a\\\"b\",le=\"0.001\"} 1
latency_seconds_bucket{route=\"a\\\"b\",le=\"0.01\"} 2
latency_seconds_bucket{route=\"a\\\"b\",le=\"+Inf\"} 3
latency_seconds_sum{route=\"a\\\"b\"} 1.0055
latency_seconds_count{route=\"a\\\"b\"} 3
";
        assert_eq!(text, expected);
        assert_eq!(h.count(), 3);
    }

    #[test]
    #[should_panic(expected = "is a counter, not a gauge")]
    fn one_name_is_one_kind() {
        let registry = Registry::new();
        registry.counter("x", "X.", &[]);
        registry.gauge("x", "X.", &[]);
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let registry = Registry::new();
        registry.counter("served_total", "Served.", &[]).add(7);
        let addr = serve(registry, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let client = crate::net::HttpClient::new(false);
        let get = |path: &str| {
            http::Request::get(format!("http://{addr}{path}"))
                .body(Full::default())
                .unwrap()
        };
        let ok = client
            .send(get("/metrics"), Duration::from_secs(5), 1 << 20)
            .await
            .unwrap();
        assert_eq!(ok.status, 200);
        assert_eq!(ok.headers[http::header::CONTENT_TYPE], CONTENT_TYPE);
        assert!(String::from_utf8_lossy(&ok.body).contains("served_total 7\n"));
        let missing = client
            .send(get("/other"), Duration::from_secs(5), 1 << 20)
            .await
            .unwrap();
        assert_eq!(missing.status, 404);
    }

    #[test]
    fn refreshers_run_before_every_render() {
        let registry = Registry::new();
        let scrapes = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&scrapes);
        registry.on_render(move |registry| {
            let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
            registry
                .gauge("scrapes", "Renders so far.", &[])
                .set(n as i64);
        });
        assert!(registry.render().contains("scrapes 1\n"));
        assert!(registry.render().contains("scrapes 2\n"));
    }
}
