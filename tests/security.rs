//! What a local user or a log reader can learn: caches, logs, records and
//! exported images are their owner's alone, and no token or key ever
//! reaches a log, an output or a file we write. Through the real binary, a
//! real chunk server and a FUSE mount.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use common::serve::{http_get, Served};
use common::tls::private_ca;
use common::*;

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// A small ext4 image holding the plaintext marker.
fn small_image(world: &World) -> PathBuf {
    let tree = world.path("tree");
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/marker.txt"), MARKER.repeat(32)).unwrap();
    fs::write(tree.join("etc/data.bin"), pseudo_random(5, 3 << 20)).unwrap();
    let image = world.path("image.ext4");
    make_ext4(&tree, &image, 8);
    image
}

fn write_secret_file(path: &Path, text: &str) {
    fs::write(path, format!("{text}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn a_cache_directory_others_may_read_is_refused_before_anything_starts() {
    let world = World::new();
    let image = small_image(&world);
    world.push(&image, "app");
    let cache = world.path("cache");
    fs::create_dir(&cache).unwrap();
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = world.path("mnt");
    fs::create_dir(&mnt).unwrap();
    let expected = format!("cache directory {} has mode 0755", cache.display());
    let fix = format!("chmod 700 {}", cache.display());
    // Daemonized: refused before the device process starts, so no log is
    // written into the exposed directory either.
    for foreground in [false, true] {
        let mut cmd = world.with_store("add");
        cmd.args(["--name", "app", "--read-only", "--cache-dir"])
            .arg(&cache)
            .arg("--fuse")
            .arg(&mnt);
        if foreground {
            cmd.arg("--foreground");
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "add into a 0755 cache succeeded");
        assert!(stderr.contains(&expected), "{stderr}");
        assert!(stderr.contains(&fix), "{stderr}");
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 0, "wrote into it");
        assert_eq!(mode(&cache), 0o755, "refused, not changed");
    }
}

/// Everything a full run printed or wrote, to search for secrets.
#[derive(Default)]
struct Transcript {
    texts: Vec<(String, Vec<u8>)>,
}

impl Transcript {
    fn output(&mut self, what: &str, out: &Output) {
        self.texts
            .push((format!("{what} stdout"), out.stdout.clone()));
        self.texts
            .push((format!("{what} stderr"), out.stderr.clone()));
    }

    fn file(&mut self, path: &Path) {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        self.texts.push((path.display().to_string(), bytes));
    }

    /// Panics naming where any of `secrets` appears.
    fn assert_free_of(&self, secrets: &[(&str, Vec<u8>)]) {
        for (where_, bytes) in &self.texts {
            for (what, secret) in secrets {
                assert!(
                    !bytes
                        .windows(secret.len())
                        .any(|w| w.eq_ignore_ascii_case(secret)),
                    "the {what} appears in {where_}"
                );
            }
        }
    }
}

/// Runs `cmd` with debug logging, records its output, and panics if it failed.
fn logged(transcript: &mut Transcript, what: &str, cmd: &mut Command) -> Output {
    let out = run(cmd.env("LAZYBLK_LOG", "debug").env("RUST_LOG", "debug"));
    transcript.output(what, &out);
    out
}

#[test]
fn a_full_run_keeps_caches_records_and_outputs_private_and_logs_no_secret() {
    let world = World::new();
    let image = small_image(&world);
    let write_token = format!("w-{}", hex::encode(rand_bytes()));
    let read_token = format!("r-{}", hex::encode(rand_bytes()));
    let (write_file, read_file) = (world.path("write.token"), world.path("read.token"));
    write_secret_file(&write_file, &write_token);
    write_secret_file(&read_file, &read_token);
    let mut transcript = Transcript::default();

    let serve_log = world.path("serve.log");
    let mut serve = world.lazyblk();
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(world.store())
        .arg("--write-token-file")
        .arg(&write_file)
        .arg("--read-token-file")
        .arg(&read_file)
        .env("LAZYBLK_LOG", "debug")
        .env("RUST_LOG", "debug")
        .stderr(Stdio::from(fs::File::create(&serve_log).unwrap()));
    let served = Served::spawn(serve);
    world.use_store(&served.url);

    logged(
        &mut transcript,
        "push",
        world
            .with_store("push")
            .arg(&image)
            .args(["--name", "app", "--token-file"])
            .arg(&write_file),
    );
    // A token from the environment, too.
    let again = logged(
        &mut transcript,
        "push again",
        world
            .with_store("push")
            .arg(&image)
            .args(["--name", "app", "--json"])
            .env("LAZYBLK_TOKEN", &write_token),
    );
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["chunks_uploaded"], 0, "{again}");

    // A device (FUSE, with metrics), read whole, its metrics scraped.
    let cache = world.path("caches/app");
    let mnt = world.path("mnt");
    fs::create_dir(&mnt).unwrap();
    logged(
        &mut transcript,
        "add",
        world
            .with_store("add")
            .args(["--name", "app", "--read-only", "--cache-dir"])
            .arg(&cache)
            .arg("--fuse")
            .arg(&mnt)
            .args(["--metrics", "127.0.0.1:0", "--token-file"])
            .arg(&read_file),
    );
    let served_image = fs::read(mnt.join("disk"));
    let device = world.device(&mnt);
    let pid = device["pid"].as_u64().unwrap();
    let record = world.run_dir().join(format!("{pid}.json"));
    transcript.file(&record);
    let metrics_addr = device["metrics"].as_str().expect("a metrics address");
    let (status, metrics) = http_get(metrics_addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    transcript
        .texts
        .push(("device metrics".into(), metrics.into_bytes()));
    let record_mode = mode(&record);
    let cache_files: Vec<(PathBuf, u32)> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let m = mode(&path);
            (path, m)
        })
        .collect();
    world.del(&mnt);
    assert_eq!(served_image.unwrap(), fs::read(&image).unwrap());

    let exported = world.path("out/exported.img");
    fs::create_dir(world.path("out")).unwrap();
    logged(
        &mut transcript,
        "export",
        world
            .with_store("export")
            .args(["--name", "app", "--out"])
            .arg(&exported)
            .arg("--token-file")
            .arg(&read_file),
    );
    assert_eq!(fs::read(&exported).unwrap(), fs::read(&image).unwrap());
    for verb in ["gc", "verify"] {
        let mut cmd = world.lazyblk();
        cmd.args([verb, "--store", &served.url, "--token-file"])
            .arg(&write_file);
        logged(&mut transcript, verb, &mut cmd);
    }
    drop(served);

    // Private: the cache directory, everything in it, the device record
    // and the exported image.
    assert_eq!(mode(&cache), 0o700);
    assert_eq!(mode(&world.path("caches")), 0o700, "created parents too");
    let names: Vec<String> = cache_files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for wanted in ["data", "present", "daemon.log"] {
        assert!(
            names.iter().any(|n| n == wanted),
            "no {wanted} in {names:?}"
        );
    }
    for (path, file_mode) in &cache_files {
        assert_eq!(*file_mode, 0o600, "{}", path.display());
    }
    assert_eq!(record_mode, 0o600, "device record");
    assert_eq!(mode(&exported), 0o600, "exported image");

    // Debug logging was on: the logs are not empty, and hold no secret.
    transcript.file(&serve_log);
    transcript.file(&cache.join("daemon.log"));
    let daemon_log = fs::read_to_string(cache.join("daemon.log")).unwrap();
    assert!(daemon_log.contains("DEBUG"), "no debug lines: {daemon_log}");
    assert!(
        fs::read_to_string(&serve_log).unwrap().contains("DEBUG"),
        "serve logged nothing at debug"
    );
    let key_hex = fs::read_to_string(world.key()).unwrap().trim().to_owned();
    let key = hex::decode(&key_hex).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    transcript.assert_free_of(&[
        ("write token", write_token.into_bytes()),
        ("read token", read_token.into_bytes()),
        ("tenant key (hex)", key_hex.into_bytes()),
        ("tenant key (base64)", b64.encode(&key).into_bytes()),
        ("tenant key (base64url)", b64url.encode(&key).into_bytes()),
        ("tenant key (raw)", key),
    ]);
}

fn rand_bytes() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    bytes.copy_from_slice(&pseudo_random(seed, 16));
    bytes
}

#[test]
fn push_and_export_over_https_trust_a_private_ca_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let [ca, cert, key] = private_ca(dir.path());
    let lazyblk = || Command::new(lazyblk_bin());
    run(lazyblk().args(["keygen", "--out"]).arg(path("tenant.key")));
    write_secret_file(&path("write.token"), "https-write-token");
    let image = path("image.raw");
    let mut bytes = pseudo_random(11, 3 << 20);
    bytes.extend(std::iter::repeat_n(0, 1 << 20));
    fs::write(&image, &bytes).unwrap();

    // A TLS key others may read is refused before the server starts.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    let mut loose = lazyblk();
    loose
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(path("store"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key);
    run_failing(&mut loose, &format!("chmod 600 {}", key.display()));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

    let mut serve = lazyblk();
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(path("store"))
        .arg("--write-token-file")
        .arg(path("write.token"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stderr(Stdio::null());
    let served = Served::spawn(serve);
    assert!(served.url.starts_with("https://"), "{}", served.url);

    let with_store = |verb: &str| {
        let mut cmd = lazyblk();
        cmd.args([verb, "--store", &served.url, "--key"])
            .arg(path("tenant.key"))
            .args(["--name", "app"]);
        cmd
    };
    let push = || {
        let mut cmd = with_store("push");
        cmd.arg(&image).arg("--token-file").arg(path("write.token"));
        cmd
    };
    // Without the CA (public roots only): a certificate error.
    run_failing(&mut push(), "invalid peer certificate: UnknownIssuer");
    // The wrong CA (the server's own certificate is no CA) fails too.
    run_failing(
        push().arg("--tls-ca").arg(&cert),
        "invalid peer certificate",
    );

    run(push().arg("--tls-ca").arg(&ca));
    let out = path("exported.img");
    run(with_store("export")
        .arg("--out")
        .arg(&out)
        .arg("--tls-ca")
        .arg(&ca));
    assert_eq!(fs::read(&out).unwrap(), bytes);
    run_failing(
        with_store("export").arg("--out").arg(path("never.img")),
        "invalid peer certificate",
    );
    assert!(!path("never.img").exists());
}

/// One request on a connection of its own: the status code.
fn status_of(addr: &str, method: &str, path: &str, token: &str, body: &[u8]) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

#[test]
fn ids_and_names_that_climb_out_of_the_store_are_refused_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    // Beside the store, where a path built from "../secret" would land.
    fs::write(path("secret"), "outside the store").unwrap();
    write_secret_file(&path("write.token"), "climb-write-token");
    let mut serve = Command::new(lazyblk_bin());
    serve
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shard-cache-size",
            "1M",
        ])
        .arg("--store")
        .arg(path("store"))
        .arg("--write-token-file")
        .arg(path("write.token"))
        .stderr(Stdio::null());
    let served = Served::spawn(serve);
    let addr = served.addr();
    let token = "climb-write-token";
    let climbs = [
        "..%2Fsecret",
        "..%2F..%2Fsecret",
        "%2E%2E%2Fsecret",
        "..",
        "ab%2F..%2F..%2F..%2Fsecret",
        "%2Fetc%2Fpasswd",
        "..\\secret",
    ];
    for climb in climbs {
        for (method, route) in [
            ("GET", format!("/v1/chunks/{climb}")),
            ("HEAD", format!("/v1/chunks/{climb}")),
            ("PUT", format!("/v1/chunks/{climb}")),
            ("DELETE", format!("/v1/chunks/{climb}")),
            ("GET", format!("/v1/manifests/{climb}")),
            ("PUT", format!("/v1/manifests/{climb}")),
            ("GET", format!("/v1/shards/{climb}/0")),
            ("PUT", format!("/v1/shards/{climb}/0")),
            ("GET", format!("/v1/chunks/../../{climb}")),
            ("GET", format!("/v1/chunks?after={climb}")),
        ] {
            let status = status_of(addr, method, &route, token, b"planted");
            assert!(
                (400..500).contains(&status),
                "{method} {route} answered {status}"
            );
        }
    }
    assert_eq!(
        fs::read_to_string(path("secret")).unwrap(),
        "outside the store"
    );
    let mut left: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["secret", "store", "write.token"], "nothing planted");
}
