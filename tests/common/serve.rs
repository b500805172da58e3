//! `lazyblk serve` as a child process on a free loopback port.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use super::lazyblk_bin;

/// A running `lazyblk serve`, killed when dropped.
pub struct Served {
    pub child: Child,
    /// `http://127.0.0.1:PORT`, as the server printed it.
    pub url: String,
}

impl Served {
    /// Starts `lazyblk serve --listen 127.0.0.1:0 ARGS…` and returns once
    /// it has printed the address it listens on.
    pub fn start<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Served {
        let mut cmd = Command::new(lazyblk_bin());
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stderr(Stdio::null());
        Served::spawn(cmd)
    }

    /// Starts `cmd`, a `lazyblk serve` command line set up by the caller
    /// (its own stderr and environment, say), and returns once it has
    /// printed the address it listens on.
    pub fn spawn(mut cmd: Command) -> Served {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lazyblk serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().to_owned();
        assert!(
            url.starts_with("http://127.0.0.1:") || url.starts_with("https://127.0.0.1:"),
            "serve printed {line:?}"
        );
        Served { child, url }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        self.url
            .trim_start_matches("https://")
            .trim_start_matches("http://")
    }

    /// The Prometheus text at this server's /metrics.
    pub fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(self.addr()).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }

    /// Chunk GETs this server answered with 200, from its /metrics.
    pub fn chunk_gets(&self) -> u64 {
        let (_, text) = http_get(self.addr(), "/metrics");
        text.lines()
            .filter(|l| l.starts_with("lazyblk_http_requests_total{"))
            .filter(|l| l.contains(r#"route="chunk_get""#) && l.contains(r#"status="200""#))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }
}

/// One GET of `http://addr/path` on a connection of its own: the status
/// line and the body.
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
