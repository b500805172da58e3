//! A bandwidth cap on chunk answers (`lazyblk serve --rate`): a stand-in
//! for the one link of limited rate between a distant origin and its
//! clients, for benchmarks.
//!
//! Answers cross the link one after another, in the order they asked for
//! it: each reserves `len / rate` of link time after whatever was reserved
//! before it, and is sent when its last byte would have arrived. An idle
//! link banks no credit, so no burst ever beats the rate.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(super) struct Link {
    bytes_per_sec: u64,
    /// When everything reserved so far has crossed the link.
    busy_until: Mutex<Instant>,
}

impl Link {
    /// A link of `bytes_per_sec` (more than zero).
    pub(super) fn new(bytes_per_sec: u64) -> Link {
        assert!(
            bytes_per_sec > 0,
            "a link carries at least one byte a second"
        );
        Link {
            bytes_per_sec,
            busy_until: Mutex::new(Instant::now()),
        }
    }

    /// Reserves the link for `len` bytes asked for at `now`; returns when
    /// they will have crossed it.
    fn reserve(&self, now: Instant, len: usize) -> Instant {
        let crossing = Duration::from_secs_f64(len as f64 / self.bytes_per_sec as f64);
        let mut busy_until = self.busy_until.lock().unwrap_or_else(|e| e.into_inner());
        let done = (*busy_until).max(now) + crossing;
        *busy_until = done;
        done
    }

    /// Waits until `len` bytes would have crossed the link, behind every
    /// answer that reserved it earlier.
    pub(super) async fn carry(&self, len: usize) {
        let done = self.reserve(Instant::now(), len);
        tokio::time::sleep_until(done).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_queue_behind_each_other_at_the_rate() {
        let link = Link::new(1000);
        let t0 = Instant::now();
        assert_eq!(link.reserve(t0, 1000), t0 + Duration::from_secs(1));
        // Asked at the same moment: sent after the first has crossed.
        assert_eq!(link.reserve(t0, 500), t0 + Duration::from_millis(1500));
        assert_eq!(link.reserve(t0, 0), t0 + Duration::from_millis(1500));
    }

    #[test]
    fn an_idle_link_banks_no_credit() {
        let link = Link::new(1000);
        let t0 = Instant::now();
        link.reserve(t0, 100);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(link.reserve(later, 2000), later + Duration::from_secs(2));
    }

    #[tokio::test]
    async fn carrying_waits_at_least_the_crossing_time_of_all_before() {
        let link = std::sync::Arc::new(Link::new(100_000));
        let start = std::time::Instant::now();
        let carries: Vec<_> = (0..3)
            .map(|_| {
                let link = link.clone();
                tokio::spawn(async move { link.carry(10_000).await })
            })
            .collect();
        for carry in carries {
            carry.await.unwrap();
        }
        // Three answers of 0.1 s each on one link: never sooner than 0.3 s.
        assert!(start.elapsed() >= Duration::from_millis(300));
    }
}
