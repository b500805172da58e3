//! The chunk server and the HTTP store through the real binary: `serve` on
//! 127.0.0.1, `push`, `export` and a FUSE device naming it by URL.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::serve::Served;
use common::{
    assert_same_tree, lazyblk_bin, make_ext4, make_tree, pseudo_random, run, run_failing, World,
};

/// `lazyblk serve` over the directory store `store`, with `extra` arguments.
fn serve(store: &Path, extra: &[&str]) -> Served {
    let mut args = vec![OsStr::new("--store"), store.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    Served::start(args)
}

/// A key, an image of random and zero chunks, and a directory for stores.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let setup = Setup {
            dir: tempfile::tempdir().unwrap(),
        };
        run(Command::new(lazyblk_bin())
            .args(["keygen", "--out"])
            .arg(setup.path("key")));
        let mut image = pseudo_random(7, 3 << 20);
        image.extend(vec![0u8; 2 << 20]);
        image.extend(pseudo_random(8, (1 << 20) + 12345));
        fs::write(setup.path("image"), image).unwrap();
        fs::write(setup.path("write.token"), "write-secret\n").unwrap();
        fs::write(setup.path("read.token"), "read-secret\n").unwrap();
        setup
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `lazyblk VERB --store STORE --key KEY --name app`.
    fn command(&self, verb: &str, store: &str) -> Command {
        let mut cmd = Command::new(lazyblk_bin());
        cmd.arg(verb)
            .args(["--store", store, "--name", "app", "--key"])
            .arg(self.path("key"))
            .env_remove("LAZYBLK_TOKEN");
        cmd
    }

    fn push(&self, store: &str, extra: &[&str]) -> serde_json::Value {
        let out = run(self
            .command("push", store)
            .arg(self.path("image"))
            .arg("--json")
            .args(extra));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn export_is_identical(&self, store: &str, extra: &[&str]) {
        let out = self.path("exported");
        let _ = fs::remove_file(&out);
        run(self
            .command("export", store)
            .arg("--out")
            .arg(&out)
            .args(extra));
        assert!(
            fs::read(&out).unwrap() == fs::read(self.path("image")).unwrap(),
            "the image exported from {store} differs"
        );
    }
}

#[test]
fn push_and_export_over_http_are_byte_identical() {
    let setup = Setup::new();
    let backing = setup.path("store");
    let serve = serve(
        &backing,
        &[
            "--write-token-file",
            setup.path("write.token").to_str().unwrap(),
        ],
    );
    let token_file = setup.path("write.token");
    let token = ["--token-file", token_file.to_str().unwrap()];
    let first = setup.push(&serve.url, &token);
    assert!(first["chunks_uploaded"].as_u64().unwrap() >= 8, "{first}");
    let again = setup.push(&serve.url, &token);
    assert_eq!(again["chunks_uploaded"], 0, "{again}");
    assert_eq!(again["bytes_uploaded"], 0, "{again}");

    setup.export_is_identical(&serve.url, &[]);
    setup.export_is_identical(&serve.url, &["--http2-prior-knowledge"]);
    // The server kept what it was sent in its own store.
    setup.export_is_identical(backing.to_str().unwrap(), &[]);
}

#[test]
fn tokens_come_from_a_file_or_the_environment() {
    let setup = Setup::new();
    let serve = serve(
        &setup.path("store"),
        &[
            "--write-token-file",
            setup.path("write.token").to_str().unwrap(),
            "--read-token-file",
            setup.path("read.token").to_str().unwrap(),
        ],
    );
    run_failing(
        setup.command("push", &serve.url).arg(setup.path("image")),
        "401 Unauthorized",
    );
    let pushed = run(setup
        .command("push", &serve.url)
        .arg(setup.path("image"))
        .env("LAZYBLK_TOKEN", "write-secret"));
    assert!(pushed.status.success());
    run_failing(
        setup
            .command("export", &serve.url)
            .arg("--out")
            .arg(setup.path("x")),
        "401 Unauthorized",
    );
    setup.export_is_identical(
        &serve.url,
        &["--token-file", setup.path("read.token").to_str().unwrap()],
    );
    run_failing(
        setup
            .command("export", &serve.url)
            .arg("--out")
            .arg(setup.path("x"))
            .args(["--token-file", "/nonexistent/token"]),
        "read token file /nonexistent/token",
    );
}

#[test]
fn sigterm_finishes_requests_in_flight_then_exits_zero() {
    let setup = Setup::new();
    let backing = setup.path("store");
    setup.push(backing.to_str().unwrap(), &[]);
    let chunk = fs::read_dir(backing.join("chunks"))
        .unwrap()
        .flat_map(|dir| fs::read_dir(dir.unwrap().path()).unwrap())
        .map(|file| file.unwrap())
        .next()
        .unwrap();
    let id = chunk.file_name().into_string().unwrap();
    let mut serve = serve(&backing, &["--delay", "800"]);

    let mut stream = TcpStream::connect(serve.addr()).unwrap();
    write!(
        stream,
        "GET /v1/chunks/{id} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    run(Command::new("kill").args(["-TERM", &serve.child.id().to_string()]));
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer[..answer.len().min(200)]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(
        answer.len() as u64 - header_len(&answer),
        chunk.metadata().unwrap().len()
    );

    let started = Instant::now();
    let status = loop {
        if let Some(status) = serve.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "serve did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "serve exited with {status}");
    assert!(TcpStream::connect(serve.addr()).is_err(), "still accepting");
}

fn header_len(answer: &[u8]) -> u64 {
    answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head") as u64
        + 4
}

#[test]
fn a_fuse_device_serves_an_image_from_a_chunk_server() {
    let world = World::new();
    let tree = world.path("tree");
    make_tree(&tree);
    let image = world.path("image.ext4");
    make_ext4(&tree, &image, 64);
    world.push(&image, "app");
    let serve = serve(&world.store(), &[]);
    world.use_store(&serve.url);

    let fuse = world.add("app", "cache", "fuse", true);
    let root = world.mount_loop(&fuse, "root", true);
    assert!(assert_same_tree(&tree, &root) > 300);
    world.umount(&root);
    world.del(&fuse);
    let exported = world.path("exported.ext4");
    run(world
        .with_store("export")
        .args(["--name", "app", "--out"])
        .arg(&exported));
    run(Command::new("cmp").arg(&image).arg(&exported));
}
