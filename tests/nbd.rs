//! `add --nbd` through independent NBD clients: libnbd's nbdinfo and
//! nbdcopy, QEMU's qemu-img and qemu-io, fio's nbd engine; TLS through the
//! same clients with a self-signed certificate; `list` and `del --nbd`.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::nbd::*;
use common::*;

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = run(Command::new("nbdinfo").args(["--json", uri]));
    serde_json::from_slice(&out.stdout).expect("nbdinfo --json prints JSON")
}

/// The export's bytes, copied out by nbdcopy.
fn copy_out(world: &World, uri: &str, name: &str) -> Vec<u8> {
    let out = world.path(name);
    run(Command::new("nbdcopy").arg(uri).arg(&out));
    fs::read(out).unwrap()
}

#[test]
fn independent_clients_read_write_and_verify_an_export() {
    let world = World::new();
    let image = pushed_image(&world, "app");
    let mut model = fs::read(&image).unwrap();
    let socket = world.path("app.sock");
    let device = NbdDevice::add(
        &world,
        "app",
        "cache",
        &format!("unix:{}", socket.display()),
        &[],
    );
    let uri = device.uri.clone();
    assert_eq!(uri, format!("nbd+unix:///app?socket={}", socket.display()));

    let info = nbdinfo_json(&uri);
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "app", "{info}");
    assert_eq!(export["export-size"].as_u64(), Some(model.len() as u64));
    for (flag, expected) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_multi_conn", true),
    ] {
        assert_eq!(export[flag].as_bool(), Some(expected), "{flag} in {info}");
    }
    assert_eq!(export["block_size_maximum"].as_u64(), Some(32 << 20));
    let listed = run(Command::new("nbdinfo").args(["--list", "--json", &uri]));
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        listed["exports"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert_eq!(listed["exports"][0]["export-name"], "app");

    // The export is the flattened image, byte for byte, through two clients.
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&image)
        .arg(&uri));
    assert!(copy_out(&world, &uri, "out0.raw") == model);

    // Writes (one with FUA), zeroes and a trim through qemu-io; a trim
    // promises nothing, so the model leaves that range to the read-back.
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0xab 1M 64k",
        "-c",
        "write -f -P 0xcd 2M 4k",
        "-c",
        "write -z 3M 1M",
        "-c",
        "discard 6M 512k",
        "-c",
        "flush",
        "-c",
        "read -P 0xab 1M 64k",
        "-c",
        "read -P 0 3M 1M",
    ]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!said.contains("failed"), "qemu-io: {said}");
    model[1 << 20..][..64 << 10].fill(0xab);
    model[2 << 20..][..4096].fill(0xcd);
    model[3 << 20..][..1 << 20].fill(0);
    let copied = copy_out(&world, &uri, "out1.raw");
    let mut trim_blind = copied.clone();
    trim_blind[6 << 20..][..512 << 10].copy_from_slice(&model[6 << 20..][..512 << 10]);
    assert!(
        trim_blind == model,
        "the export differs from the model after qemu-io"
    );

    // fio writes with many requests in flight and reads every block back.
    let fio = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--offset=8M",
            "--size=4M",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .output()
        .expect("run fio");
    assert!(
        fio.status.success(),
        "fio: {}\n{}",
        String::from_utf8_lossy(&fio.stdout),
        String::from_utf8_lossy(&fio.stderr)
    );
    let after_fio = copy_out(&world, &uri, "out2.raw");
    assert!(
        after_fio[..8 << 20] == copied[..8 << 20],
        "fio wrote outside its range"
    );
    assert!(after_fio[8 << 20..][..4 << 20] != copied[8 << 20..][..4 << 20]);

    // The device is listed under its listener and removed by it.
    let list = run(world.lazyblk().args(["list", "--json"]));
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let listed = &list[0];
    assert_eq!(listed["frontend"], "nbd", "{list}");
    assert_eq!(listed["target"], format!("unix:{}", socket.display()));
    assert!(listed["stats"]["chunks_fetched"].as_u64().unwrap() > 0);
    run(world.lazyblk().args(["del", "--nbd", &device.listener]));
    assert!(!device.is_alive(), "del returned before the process exited");
    assert!(!socket.exists(), "the socket outlived the device");

    // What was written survives the restart, served from the cache.
    let device = NbdDevice::add(&world, "app", "cache", &device.listener, &[]);
    assert!(copy_out(&world, &device.uri, "out3.raw") == after_fio);
}

#[test]
fn a_read_only_export_over_tcp_refuses_writes_and_del_all_stops_it() {
    let world = World::new();
    let image = pushed_image(&world, "ro");
    let device = NbdDevice::add(&world, "ro", "cache", "tcp:127.0.0.1:0", &["--read-only"]);
    assert!(device.uri.starts_with("nbd://127.0.0.1:"), "{}", device.uri);
    let info = nbdinfo_json(&device.uri);
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info}");
    assert_eq!(info["exports"][0]["can_trim"], false, "{info}");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&image)
        .arg(&device.uri));

    let (mut client, _) = RawClient::tcp(&device.addr()).transmitting();
    assert_eq!(client.write(1, 0, 0, &[1u8; 4096]), EPERM);
    client.request(CMD_TRIM, 0, 2, 0, 4096);
    assert_eq!(client.reply(), (2, EPERM));
    client.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096);
    assert_eq!(client.reply(), (3, EPERM));
    let head = client.read(4, 0, 8192).unwrap();
    assert!(head == fs::read(&image).unwrap()[..8192]);

    // A connected client makes a plain del refuse; --all --force stops it.
    let del = world
        .lazyblk()
        .args(["del", "--nbd", &device.listener])
        .output()
        .unwrap();
    assert!(!del.status.success());
    assert!(
        String::from_utf8_lossy(&del.stderr).contains("client(s) connected"),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    assert!(device.is_alive());
    run(world.lazyblk().args(["del", "--all", "--force"]));
    assert!(!device.is_alive());
    assert!(client.is_closed());
}

/// A self-signed certificate for 127.0.0.1 in `dir`, named as libnbd and
/// QEMU look for a CA (`ca-cert.pem`), with its key beside it.
fn self_signed(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("ca-cert.pem")));
}

#[test]
fn with_tls_clients_must_starttls_and_then_read_the_image() {
    let world = World::new();
    let image = pushed_image(&world, "tls");
    let pki = world.path("pki");
    self_signed(&pki);
    let (cert, key) = (pki.join("ca-cert.pem"), pki.join("key.pem"));
    let device = NbdDevice::add(
        &world,
        "tls",
        "cache",
        "tcp:127.0.0.1:0",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(device.uri.starts_with("nbds://"), "{}", device.uri);

    let tls_uri = format!("{}?tls-certificates={}", device.uri, pki.display());
    let out = run(Command::new("nbdinfo").arg(&tls_uri));
    assert!(String::from_utf8_lossy(&out.stdout).contains("with TLS"));
    let port = device.addr().rsplit(':').next().unwrap().to_owned();
    run(Command::new("qemu-img")
        .arg("compare")
        .arg("--object")
        .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.display()))
        .arg("--image-opts")
        .arg(format!("driver=raw,file.driver=file,file.filename={}", image.display()))
        .arg(format!(
            "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export=tls,file.tls-creds=tls0"
        )));

    // Without TLS, libnbd gets nowhere, and raw options are refused.
    let plain = Command::new("nbdinfo")
        .arg(format!("nbd://{}/tls", device.addr()))
        .output()
        .unwrap();
    assert!(!plain.status.success());
    let mut client = RawClient::tcp(&device.addr());
    client.client_flags();
    client.option(OPT_LIST, &[]);
    assert_eq!(client.option_reply(OPT_LIST).0, REP_ERR_TLS_REQD);
    assert_eq!(client.go("tls"), Err(REP_ERR_TLS_REQD));
    client.option(OPT_STARTTLS, b"junk");
    assert_eq!(client.option_reply(OPT_STARTTLS).0, REP_ERR_INVALID);
    // EXPORT_NAME cannot be refused with a reply: the server hangs up.
    client.option(OPT_EXPORT_NAME, b"tls");
    assert!(client.is_closed());
    assert!(device.is_alive());
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").current_dir(dir).args(args));
}

/// A key and a certificate signed by `ca` (its `ca-cert.pem` and
/// `ca-key.pem` in `dir`), written as `NAME-key.pem` and `NAME-cert.pem`.
fn signed(dir: &Path, name: &str, subject: &str, extensions: &str, ca: &str) {
    let (key, csr, cert) = (
        format!("{name}-key.pem"),
        format!("{name}.csr"),
        format!("{name}-cert.pem"),
    );
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &key,
        ],
    );
    openssl(
        dir,
        &["req", "-new", "-key", &key, "-subj", subject, "-out", &csr],
    );
    fs::write(dir.join(format!("{name}.ext")), extensions).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-days",
            "2",
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &cert,
        ],
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it
/// signed, in `dir`; and a client certificate from another CA in
/// `dir/rogue`, laid out as libnbd looks for them (`ca-cert.pem`,
/// `client-cert.pem`, `client-key.pem`).
fn client_pki(dir: &Path) {
    let rogue = dir.join("rogue");
    fs::create_dir_all(&rogue).unwrap();
    for ca_dir in [dir, &rogue] {
        openssl(
            ca_dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
            ],
        );
    }
    signed(
        dir,
        "server",
        "/CN=localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        "ca",
    );
    for client_dir in [dir, &rogue] {
        signed(
            client_dir,
            "client",
            "/CN=client",
            "extendedKeyUsage=clientAuth\n",
            "ca",
        );
    }
    // The rogue client trusts the real server; its own certificate is what
    // the server must refuse.
    fs::copy(dir.join("ca-cert.pem"), rogue.join("ca-cert.pem")).unwrap();
}

#[test]
fn with_a_client_ca_only_clients_it_signed_are_served() {
    let world = World::new();
    pushed_image(&world, "mtls");
    let pki = world.path("pki");
    fs::create_dir_all(&pki).unwrap();
    client_pki(&pki);
    let path = |name: &str| pki.join(name).to_str().unwrap().to_owned();
    let device = NbdDevice::add(
        &world,
        "mtls",
        "cache",
        "tcp:127.0.0.1:0",
        &[
            "--tls-cert",
            &path("server-cert.pem"),
            "--tls-key",
            &path("server-key.pem"),
            "--tls-client-ca",
            &path("ca-cert.pem"),
        ],
    );
    let served = |certificates: &Path| {
        Command::new("nbdinfo")
            .arg(format!(
                "{}?tls-certificates={}",
                device.uri,
                certificates.display()
            ))
            .output()
            .unwrap()
    };
    let signed_client = served(&pki);
    assert!(signed_client.status.success(), "{signed_client:?}");
    assert!(String::from_utf8_lossy(&signed_client.stdout).contains("with TLS"));
    let rogue = served(&pki.join("rogue"));
    assert!(
        !rogue.status.success(),
        "a client the CA did not sign was served"
    );
    // No client certificate at all.
    let anonymous = world.path("anonymous");
    fs::create_dir_all(&anonymous).unwrap();
    fs::copy(pki.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();
    let anonymous = served(&anonymous);
    assert!(
        !anonymous.status.success(),
        "a client without a certificate was served"
    );
    // Before STARTTLS, options are still refused.
    let mut client = RawClient::tcp(&device.addr());
    client.client_flags();
    assert_eq!(client.go("mtls"), Err(REP_ERR_TLS_REQD));
    assert!(device.is_alive());
}
