//! `lazyblk serve` in cache mode, through the real binary: a cache server
//! (`--origin URL --cache-dir DIR`) in front of an origin chunk server,
//! both on 127.0.0.1, read by `export` processes.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{lazyblk_bin, pseudo_random, run};

const CHUNKS: usize = 24;
const CHUNK: usize = 64 * 1024;

/// A `lazyblk serve` process, killed when dropped.
struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    fn start(args: &[&std::ffi::OsStr]) -> Serve {
        let mut child = Command::new(lazyblk_bin())
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start lazyblk serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().to_owned();
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "serve printed {line:?}"
        );
        Serve { child, url }
    }

    /// Chunk GETs this server answered with 200, from its /metrics.
    fn chunk_gets(&self) -> u64 {
        let mut stream = TcpStream::connect(self.url.trim_start_matches("http://")).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text.lines()
            .filter(|l| l.starts_with("lazyblk_http_requests_total{"))
            .filter(|l| l.contains(r#"route="chunk_get""#) && l.contains(r#"status="200""#))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn export(dir: &Path, store: &str, out: &str) -> Command {
    let mut cmd = Command::new(lazyblk_bin());
    cmd.args(["export", "--name", "app", "--store", store, "--key"])
        .arg(dir.join("key"))
        .arg("--out")
        .arg(dir.join(out));
    cmd
}

fn path_arg(path: PathBuf) -> std::ffi::OsString {
    path.into_os_string()
}

#[test]
fn a_cache_server_fetches_each_chunk_from_its_origin_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    run(Command::new(lazyblk_bin())
        .args(["keygen", "--out"])
        .arg(root.join("key")));
    let image = pseudo_random(9, CHUNKS * CHUNK);
    std::fs::write(root.join("app.img"), &image).unwrap();
    run(Command::new(lazyblk_bin())
        .arg("push")
        .arg(root.join("app.img"))
        .args(["--name", "app", "--chunk-size", "64K", "--store"])
        .arg(root.join("origin"))
        .arg("--key")
        .arg(root.join("key")));

    let origin = Serve::start(&["--store".as_ref(), root.join("origin").as_os_str()]);
    let cache_args = [
        "--origin".into(),
        origin.url.clone().into(),
        "--cache-dir".into(),
        path_arg(root.join("cache")),
        "--cache-size".into(),
        "64M".into(),
    ];
    let cache_refs: Vec<&std::ffi::OsStr> = cache_args.iter().map(|a| a.as_os_str()).collect();
    let cache = Serve::start(&cache_refs);

    // Four readers at once: each chunk still leaves the origin once.
    let mut readers: Vec<Child> = (0..4)
        .map(|n| {
            export(root, &cache.url, &format!("out{n}"))
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for reader in &mut readers {
        assert!(reader.wait().unwrap().success());
    }
    for n in 0..4 {
        assert!(std::fs::read(root.join(format!("out{n}"))).unwrap() == image);
    }
    assert_eq!(origin.chunk_gets(), CHUNKS as u64);
    assert_eq!(cache.chunk_gets(), 4 * CHUNKS as u64);

    // A restarted cache server serves from its disk: the origin sees nothing.
    drop(cache);
    let cache = Serve::start(&cache_refs);
    run(&mut export(root, &cache.url, "again"));
    assert!(std::fs::read(root.join("again")).unwrap() == image);
    assert_eq!(origin.chunk_gets(), CHUNKS as u64);
}
