//! `lazyblk fault-proxy` as a child process in front of an HTTP store,
//! with its counters and rates reachable from the test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use super::lazyblk_bin;
use super::serve::http_get;

/// The paths of chunks on a chunk server.
const CHUNKS: &str = "/v1/chunks/";

/// A running fault proxy, killed when dropped.
pub struct FaultProxy {
    pub child: Child,
    /// `http://127.0.0.1:PORT`, as the proxy printed it.
    pub url: String,
}

impl FaultProxy {
    /// Starts `lazyblk fault-proxy --upstream UPSTREAM ARGS…` (e.g.
    /// `["--flip-rate", "0.5", "--seed", "3"]`), faults on chunk reads
    /// only, and returns once it listens.
    pub fn start(upstream: &str, args: &[&str]) -> FaultProxy {
        let mut child = Command::new(lazyblk_bin())
            .args([
                "fault-proxy",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                upstream,
            ])
            .args(["--only-under", CHUNKS])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start lazyblk fault-proxy");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().to_owned();
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "fault-proxy printed {line:?}"
        );
        FaultProxy { child, url }
    }

    fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// What the proxy has done so far (`FaultCounts` as JSON).
    pub fn counts(&self) -> serde_json::Value {
        let (status, body) = http_get(self.addr(), "/_fault-proxy/stats");
        assert!(status.contains(" 200 "), "{status}: {body}");
        serde_json::from_str(&body).expect("stats are JSON")
    }

    /// One counter of [`FaultProxy::counts`].
    pub fn count(&self, name: &str) -> u64 {
        self.counts()[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// The most GETs any one chunk received, and how many chunks were asked for.
    pub fn most_gets_per_chunk(&self) -> (u64, usize) {
        let counts = self.counts();
        let chunks: Vec<u64> = counts["gets_by_path"]
            .as_object()
            .expect("gets by path")
            .iter()
            .filter(|(path, _)| path.starts_with(CHUNKS))
            .map(|(_, n)| n.as_u64().unwrap())
            .collect();
        (chunks.iter().copied().max().unwrap_or(0), chunks.len())
    }

    /// Replaces the rates, e.g. `{"stall_rate": 1.0}` (rates left out are
    /// 0), still on chunk reads only. Requests stalled until now go on.
    pub fn set_rates(&self, mut rates: serde_json::Value) {
        rates["only_under"] = CHUNKS.into();
        let body = rates.to_string();
        let mut stream = TcpStream::connect(self.addr()).unwrap();
        write!(
            stream,
            "PUT /_fault-proxy/rates HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
