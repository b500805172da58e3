//! The cold-start benchmark's results (scripts/bench-coldstart.sh): one
//! JSON object a line, `{"kind": "start", ...}` per timed start and
//! `{"kind": "push", ...}` per push of the corpus; and what follows from
//! them: the starts side by side, and each workload's sparsity.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::percent;

/// One timed start of a workload.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Start {
    pub workload: String,
    pub image: String,
    /// `baseline` (pull + unpack + run), `cold`, `prefetch`, `warm`, or
    /// `probe` (cold with readahead off: exactly the chunks the workload reads).
    pub variant: String,
    /// How the origin was reached, e.g. "10 ms" or "5 ms at 200 Mbit/s".
    pub origin: String,
    pub delay_ms: u64,
    #[serde(default)]
    pub rate_bytes_per_sec: Option<u64>,
    /// Seconds from the start (`add`, or the pull) to the first answer.
    pub ready_secs: f64,
    /// Seconds from the start to the workload's end.
    pub done_secs: f64,
    /// Bytes that crossed from the origin (registry or chunk store).
    pub bytes_moved: u64,
    #[serde(default)]
    pub chunks_fetched: Option<u64>,
    #[serde(default)]
    pub chunks_total: Option<u64>,
    #[serde(default)]
    pub chunks_zero: Option<u64>,
    /// The load average when the start ended.
    #[serde(default)]
    pub load: String,
}

/// Why a results file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("results line {line}: {reason}")]
pub struct ResultsError {
    pub line: usize,
    pub reason: String,
}

/// The starts in a results file, in file order; other kinds of line are
/// skipped.
pub fn parse(text: &str) -> Result<Vec<Start>, ResultsError> {
    let mut starts = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let error = |reason: String| ResultsError {
            line: index + 1,
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| error(format!("not JSON: {e}")))?;
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("start") => starts.push(
                serde_json::from_value(value)
                    .map_err(|e| error(format!("not a start record: {e}")))?,
            ),
            Some(_) => {}
            None => return Err(error("no \"kind\" field".into())),
        }
    }
    Ok(starts)
}

/// How much of its image a workload reads and fetches.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sparsity {
    pub workload: String,
    pub image: String,
    /// Stored (non-zero) chunks in the image.
    pub chunks_stored: u64,
    /// Chunks the workload reads (the probe start, readahead off).
    pub chunks_read: u64,
    /// Envelope bytes of those chunks.
    pub bytes_read: u64,
    /// Chunks a cold start fetched (readahead on), at the same origin.
    pub chunks_fetched_cold: Option<u64>,
}

impl Sparsity {
    pub fn percent_read(&self) -> f64 {
        percent(self.chunks_read, self.chunks_stored)
    }

    pub fn percent_fetched_cold(&self) -> Option<f64> {
        self.chunks_fetched_cold
            .map(|n| percent(n, self.chunks_stored))
    }
}

/// Each workload's sparsity, from its probe start and the cold start at
/// the probe's origin.
pub fn sparsity(starts: &[Start]) -> Vec<Sparsity> {
    starts
        .iter()
        .filter(|s| s.variant == "probe")
        .filter_map(|probe| {
            let stored = probe.chunks_total? - probe.chunks_zero.unwrap_or(0);
            let cold = starts.iter().find(|s| {
                s.variant == "cold" && s.workload == probe.workload && s.origin == probe.origin
            });
            Some(Sparsity {
                workload: probe.workload.clone(),
                image: probe.image.clone(),
                chunks_stored: stored,
                chunks_read: probe.chunks_fetched?,
                bytes_read: probe.bytes_moved,
                chunks_fetched_cold: cold.and_then(|c| c.chunks_fetched),
            })
        })
        .collect()
}

/// The variants of one workload at one origin, side by side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub workload: String,
    pub origin: String,
    pub delay_ms: u64,
    /// By variant: the start (the last one, if the file holds several).
    pub variants: BTreeMap<String, Start>,
}

/// The timed starts grouped by workload and origin, in file order; the
/// baseline (measured once per workload) joins every origin's row.
pub fn rows(starts: &[Start]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for start in starts
        .iter()
        .filter(|s| !matches!(s.variant.as_str(), "baseline" | "probe"))
    {
        let row = match rows
            .iter_mut()
            .position(|r| r.workload == start.workload && r.origin == start.origin)
        {
            Some(at) => &mut rows[at],
            None => {
                rows.push(Row {
                    workload: start.workload.clone(),
                    origin: start.origin.clone(),
                    delay_ms: start.delay_ms,
                    variants: BTreeMap::new(),
                });
                rows.last_mut().expect("just pushed")
            }
        };
        row.variants.insert(start.variant.clone(), start.clone());
    }
    for row in &mut rows {
        let baseline = starts
            .iter()
            .rev()
            .find(|s| s.variant == "baseline" && s.workload == row.workload);
        if let Some(baseline) = baseline {
            row.variants.insert("baseline".into(), baseline.clone());
        }
    }
    rows
}

impl Row {
    pub fn done(&self, variant: &str) -> Option<f64> {
        self.variants.get(variant).map(|s| s.done_secs)
    }

    pub fn ready(&self, variant: &str) -> Option<f64> {
        self.variants.get(variant).map(|s| s.ready_secs)
    }

    pub fn bytes_moved(&self, variant: &str) -> Option<u64> {
        self.variants.get(variant).map(|s| s.bytes_moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(variant: &str, origin: &str, done: f64, fetched: u64, moved: u64) -> String {
        serde_json::json!({
            "kind": "start", "workload": "numpy", "image": "app", "variant": variant,
            "origin": origin, "delay_ms": 0, "rate_bytes_per_sec": null,
            "ready_secs": done, "done_secs": done, "bytes_moved": moved,
            "chunks_fetched": fetched, "chunks_total": 1000, "chunks_zero": 200, "load": "1.0"
        })
        .to_string()
    }

    #[test]
    fn sparsity_is_the_probe_against_the_stored_chunks() {
        let text = [
            r#"{"kind": "push", "name": "app", "report": {}}"#.to_owned(),
            line("probe", "0 ms", 1.0, 40, 40 << 19),
            line("cold", "0 ms", 0.5, 64, 64 << 19),
            line("cold", "10 ms", 0.9, 66, 66 << 19),
        ]
        .join("\n");
        let starts = parse(&text).unwrap();
        assert_eq!(starts.len(), 3);
        let sparsity = sparsity(&starts);
        assert_eq!(sparsity.len(), 1);
        assert_eq!(sparsity[0].chunks_stored, 800);
        assert_eq!(sparsity[0].percent_read(), 5.0);
        assert_eq!(sparsity[0].percent_fetched_cold(), Some(8.0));
    }

    #[test]
    fn rows_put_variants_side_by_side_with_the_baseline() {
        let text = [
            line("baseline", "loopback registry", 5.0, 0, 1 << 28),
            line("cold", "0 ms", 0.5, 64, 64 << 19),
            line("warm", "0 ms", 0.2, 0, 0),
            line("cold", "10 ms", 0.9, 66, 66 << 19),
        ]
        .join("\n");
        let rows = rows(&parse(&text).unwrap());
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].done("cold"), Some(0.5));
        assert_eq!(rows[0].done("warm"), Some(0.2));
        assert_eq!(rows[1].done("baseline"), Some(5.0));
        assert_eq!(rows[1].done("warm"), None);
    }

    #[test]
    fn a_bad_line_is_named() {
        let err = parse("{\"kind\": \"start\"}\n").unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.reason.contains("not a start record"), "{err}");
        assert_eq!(parse("\n[1\n").unwrap_err().line, 2);
    }
}
