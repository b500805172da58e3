//! What the fault proxy does to each request, and what it has done.
//!
//! Every GET (under a path prefix, if one is given) draws one outcome from
//! the configured rates with a seeded generator: at most one fault per
//! request, so the rates add up to the share of reads that go wrong. Other
//! requests are never harmed: uploads, listings and, with a prefix such as
//! `/v1/chunks/`, manifests set a test up; the read path is under test.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How often each fault is injected, as shares of GET requests in [0, 1]
/// whose sum is at most 1.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRates {
    /// Only GETs whose path starts with this draw faults (all when empty).
    pub only_under: String,
    /// Added before every request is forwarded, whatever its method.
    pub latency_ms: u64,
    /// Answered `503 Service Unavailable` without reaching the upstream.
    pub error_rate: f64,
    /// The connection reset (TCP RST) instead of an answer.
    pub reset_rate: f64,
    /// Held unanswered until the rates change (then forwarded) or two
    /// minutes pass (then 504).
    pub stall_rate: f64,
    /// A successful answer's body cut short, with a `Content-Length` that
    /// matches the cut: only the reader's own check can tell.
    pub truncate_rate: f64,
    /// One bit of a successful answer's body flipped.
    pub flip_rate: f64,
}

impl FaultRates {
    /// Checks that every rate is a share and that they add up to one at most.
    pub fn validate(&self) -> Result<(), String> {
        let rates = self.rates();
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} is {rate}; a rate is between 0 and 1"));
            }
        }
        let sum: f64 = rates.iter().map(|(_, rate)| rate).sum();
        if sum > 1.0 + 1e-9 {
            return Err(format!(
                "the rates add up to {sum}; a request gets one fault at most, so they add up to 1 at most"
            ));
        }
        Ok(())
    }

    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms)
    }

    /// The rates in the order outcomes are drawn.
    fn rates(&self) -> [(&'static str, f64); 5] {
        [
            ("error_rate", self.error_rate),
            ("reset_rate", self.reset_rate),
            ("stall_rate", self.stall_rate),
            ("truncate_rate", self.truncate_rate),
            ("flip_rate", self.flip_rate),
        ]
    }
}

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forward,
    Error,
    Reset,
    Stall,
    Truncate,
    Flip,
}

/// What the proxy has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    /// Requests received (control requests aside).
    pub requests: u64,
    /// Requests passed to the upstream.
    pub forwarded: u64,
    /// Requests that waited for the configured latency.
    pub delayed: u64,
    pub errors: u64,
    pub resets: u64,
    pub stalls: u64,
    pub truncations: u64,
    pub flips: u64,
    /// Requests the upstream failed to answer (answered 502 here).
    pub upstream_failures: u64,
    /// GET requests by path: how often each object was asked for, faults
    /// and retries included.
    pub gets_by_path: BTreeMap<String, u64>,
}

/// The rates in force, the generator and the counts, behind one lock: a
/// request holds it for a draw and a few additions.
#[derive(Debug)]
pub struct Plan {
    inner: Mutex<PlanState>,
}

#[derive(Debug)]
struct PlanState {
    rates: FaultRates,
    rng: StdRng,
    counts: FaultCounts,
}

impl Plan {
    pub fn new(rates: FaultRates, seed: u64) -> Plan {
        Plan {
            inner: Mutex::new(PlanState {
                rates,
                rng: StdRng::seed_from_u64(seed),
                counts: FaultCounts::default(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PlanState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn rates(&self) -> FaultRates {
        self.state().rates.clone()
    }

    pub fn set_rates(&self, rates: FaultRates) {
        self.state().rates = rates;
    }

    pub fn counts(&self) -> FaultCounts {
        self.state().counts.clone()
    }

    /// Counts a request to `path` and draws its outcome (a GET's only).
    pub fn draw(&self, is_get: bool, path: &str) -> (Outcome, Duration) {
        let mut state = self.state();
        let latency = state.rates.latency();
        let counts = &mut state.counts;
        counts.requests += 1;
        if !latency.is_zero() {
            counts.delayed += 1;
        }
        if !is_get {
            return (Outcome::Forward, latency);
        }
        *counts.gets_by_path.entry(path.to_owned()).or_default() += 1;
        if !path.starts_with(&state.rates.only_under) {
            return (Outcome::Forward, latency);
        }
        let roll: f64 = state.rng.gen();
        let outcomes = [
            Outcome::Error,
            Outcome::Reset,
            Outcome::Stall,
            Outcome::Truncate,
            Outcome::Flip,
        ];
        let mut bound = 0.0;
        for ((_, rate), outcome) in state.rates.rates().into_iter().zip(outcomes) {
            bound += rate;
            if roll < bound {
                return (outcome, latency);
            }
        }
        (Outcome::Forward, latency)
    }

    /// A random value below `below` (positive), for where to cut or flip.
    pub fn position(&self, below: usize) -> usize {
        self.state().rng.gen_range(0..below)
    }

    /// Records that `outcome` was carried out (a truncation or flip only
    /// happens to a successful answer with a body).
    pub fn record(&self, outcome: Outcome) {
        let mut state = self.state();
        let counts = &mut state.counts;
        let counter = match outcome {
            Outcome::Forward => &mut counts.forwarded,
            Outcome::Error => &mut counts.errors,
            Outcome::Reset => &mut counts.resets,
            Outcome::Stall => &mut counts.stalls,
            Outcome::Truncate => &mut counts.truncations,
            Outcome::Flip => &mut counts.flips,
        };
        *counter += 1;
    }

    pub fn upstream_failed(&self) {
        self.state().counts.upstream_failures += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_must_be_shares_that_add_up_to_one_at_most() {
        assert!(FaultRates::default().validate().is_ok());
        let too_high = FaultRates {
            flip_rate: 1.5,
            ..FaultRates::default()
        };
        assert!(too_high.validate().unwrap_err().contains("flip_rate"));
        let too_many = FaultRates {
            error_rate: 0.6,
            stall_rate: 0.6,
            ..FaultRates::default()
        };
        assert!(too_many.validate().unwrap_err().contains("add up"));
        let nan = FaultRates {
            reset_rate: f64::NAN,
            ..FaultRates::default()
        };
        assert!(nan.validate().is_err());
    }

    #[test]
    fn draws_follow_the_rates_and_only_gets_are_harmed() {
        let rates = FaultRates {
            error_rate: 0.25,
            flip_rate: 0.25,
            ..FaultRates::default()
        };
        let plan = Plan::new(rates.clone(), 7);
        let mut errors = 0;
        let mut flips = 0;
        for _ in 0..4000 {
            match plan.draw(true, "/a").0 {
                Outcome::Error => errors += 1,
                Outcome::Flip => flips += 1,
                Outcome::Forward => {}
                other => panic!("{other:?} has rate 0"),
            }
        }
        assert!((800..1200).contains(&errors), "{errors}");
        assert!((800..1200).contains(&flips), "{flips}");
        for _ in 0..100 {
            assert_eq!(plan.draw(false, "/b").0, Outcome::Forward);
        }
        let counts = plan.counts();
        assert_eq!(counts.requests, 4100);
        assert_eq!(counts.gets_by_path.get("/a"), Some(&4000));
        assert_eq!(counts.gets_by_path.get("/b"), None);

        plan.set_rates(FaultRates {
            only_under: "/v1/chunks/".into(),
            error_rate: 1.0,
            ..FaultRates::default()
        });
        assert_eq!(plan.draw(true, "/v1/manifests/a").0, Outcome::Forward);
        assert_eq!(plan.draw(true, "/v1/chunks/ab").0, Outcome::Error);
    }

    #[test]
    fn a_seed_gives_the_same_sequence() {
        let rates = FaultRates {
            reset_rate: 0.5,
            ..FaultRates::default()
        };
        let run = |seed| {
            let plan = Plan::new(rates.clone(), seed);
            (0..64)
                .map(|_| plan.draw(true, "/").0 == Outcome::Reset)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
