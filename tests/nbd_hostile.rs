//! The NBD server against a hand-driven client sending what well-behaved
//! clients never do: each misdeed gets the protocol's answer (an error
//! reply, or a closed connection where the stream can no longer be
//! trusted), and the daemon keeps serving a bystander connected throughout.

mod common;

use std::collections::HashMap;
use std::fs;

use common::nbd::*;
use common::*;

/// Fields drop in order: the device is stopped while the world's run
/// directory still names it.
struct Setup {
    device: NbdDevice,
    world: World,
    image: Vec<u8>,
    socket: std::path::PathBuf,
}

fn setup() -> Setup {
    let world = World::new();
    let image = fs::read(pushed_image(&world, "app")).unwrap();
    let socket = world.path("app.sock");
    let device = NbdDevice::add(
        &world,
        "app",
        "cache",
        &format!("unix:{}", socket.display()),
        &[],
    );
    Setup {
        world,
        image,
        device,
        socket,
    }
}

/// Reads at a few places through `client` and checks the bytes.
fn still_serves(client: &mut RawClient, image: &[u8]) {
    for (handle, offset) in [(900, 0usize), (901, 1 << 20), (902, image.len() - 4096)] {
        let data = client.read(handle, offset as u64, 4096).expect("a read");
        assert!(data == image[offset..][..4096], "read at {offset}");
    }
}

#[test]
fn malformed_handshakes_end_only_their_own_connection() {
    let s = setup();
    let (mut bystander, size) = RawClient::unix(&s.socket).transmitting();
    assert_eq!(size, s.image.len() as u64);

    // Client flags the server does not know.
    let mut client = RawClient::unix(&s.socket);
    client.send(&0x8000_0003u32.to_be_bytes());
    assert!(client.is_closed());

    // An option without IHAVEOPT in front.
    let mut client = RawClient::unix(&s.socket);
    client.client_flags();
    client.send(&[0x42; 16]);
    assert!(client.is_closed());

    // An option claiming 1 GiB of data.
    let mut client = RawClient::unix(&s.socket);
    client.client_flags();
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&(1u32 << 30).to_be_bytes());
    client.send(&header);
    assert!(client.is_closed());

    // Unknown and unsupported options are refused and haggling goes on;
    // malformed GO data and unknown exports likewise.
    let mut client = RawClient::unix(&s.socket);
    client.client_flags();
    client.option(99, b"whatever");
    assert_eq!(client.option_reply(99).0, REP_ERR_UNSUP);
    client.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(client.option_reply(OPT_STRUCTURED_REPLY).0, REP_ERR_UNSUP);
    client.option(OPT_STARTTLS, &[]);
    assert_eq!(client.option_reply(OPT_STARTTLS).0, REP_ERR_UNSUP);
    client.option(OPT_GO, &[0, 0, 0, 9, b'a']);
    assert_eq!(client.option_reply(OPT_GO).0, REP_ERR_INVALID);
    assert_eq!(client.go("other"), Err(REP_ERR_UNKNOWN));
    client.option(OPT_LIST, &[]);
    let (kind, server) = client.option_reply(OPT_LIST);
    assert_eq!((kind, &server[..]), (REP_SERVER, &b"\0\0\0\x03app"[..]));
    assert_eq!(client.option_reply(OPT_LIST).0, REP_ACK);
    client.option(OPT_INFO, &[0, 0, 0, 3, b'a', b'p', b'p', 0, 0]);
    let (kind, info) = client.option_reply(OPT_INFO);
    assert_eq!((kind, &info[..2]), (REP_INFO, &[0u8, 0][..]));
    assert_eq!(client.option_reply(OPT_INFO).0, REP_ACK);
    let (_, flags) = client.go("app").expect("GO after refusals");
    assert_eq!(flags & 1, 1, "NBD_FLAG_HAS_FLAGS");
    still_serves(&mut client, &s.image);

    // An old client: EXPORT_NAME, no zero padding asked for.
    let mut client = RawClient::unix(&s.socket);
    client.client_flags();
    client.option(OPT_EXPORT_NAME, b"app");
    assert_eq!(client.u64(), s.image.len() as u64);
    let _flags = client.u16();
    still_serves(&mut client, &s.image);
    // ... and one asking for an export that is not there is hung up on.
    let mut client = RawClient::unix(&s.socket);
    client.client_flags();
    client.option(OPT_EXPORT_NAME, b"nope");
    assert!(client.is_closed());

    // ABORT is acknowledged.
    let mut client = RawClient::unix(&s.socket);
    client.client_flags();
    client.option(OPT_ABORT, &[]);
    assert_eq!(client.option_reply(OPT_ABORT).0, REP_ACK);
    assert!(client.is_closed());

    still_serves(&mut bystander, &s.image);
    assert!(s.device.is_alive());
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let s = setup();
    let size = s.image.len() as u64;
    let (mut client, _) = RawClient::unix(&s.socket).transmitting();

    assert_eq!(
        client.read(1, size - 4096, 8192),
        Err(EINVAL),
        "read past the end"
    );
    assert_eq!(
        client.read(2, u64::MAX - 10, 100),
        Err(EINVAL),
        "offset overflow"
    );
    assert_eq!(
        client.write(3, 0, size - 10, &[7u8; 20]),
        ENOSPC,
        "write past the end"
    );
    assert_eq!(
        client.read(4, 0, 64 << 20),
        Err(EINVAL),
        "read above the maximum"
    );
    client.request(CMD_TRIM, 0, 5, size, 4096);
    assert_eq!(client.reply(), (5, EINVAL), "trim past the end");
    client.request(42, 0, 6, 0, 4096);
    assert_eq!(client.reply(), (6, EINVAL), "unknown command");
    client.request(CMD_READ, 1 << 9, 7, 0, 4096);
    assert_eq!(client.reply(), (7, EINVAL), "unknown flag");
    // The protocol requires FUA to be accepted on any command.
    client.request(CMD_READ, FLAG_FUA, 8, 0, 4096);
    assert_eq!(client.reply(), (8, 0), "FUA on a read");
    assert!(client.bytes(4096) == s.image[..4096]);
    client.request(CMD_FLUSH, FLAG_FUA, 9, 0, 0);
    assert_eq!(client.reply(), (9, 0), "FUA on a flush");
    still_serves(&mut client, &s.image);

    // A FUA write, a flush, zeroes; then read back.
    assert_eq!(client.write(10, FLAG_FUA, 4096, &[0x5a; 8192]), 0);
    client.request(CMD_FLUSH, 0, 11, 0, 0);
    assert_eq!(client.reply(), (11, 0));
    client.request(CMD_WRITE_ZEROES, 2, 12, 8192, 2048);
    assert_eq!(client.reply(), (12, 0), "WRITE_ZEROES with NO_HOLE");
    let data = client.read(13, 4096, 8192).unwrap();
    assert!(data[..4096] == [0x5a; 4096] && data[4096..6144] == [0; 2048]);
    assert!(data[6144..] == [0x5a; 2048]);
    let mut model = s.image.clone();
    model[4096..12288].fill(0x5a);
    model[8192..10240].fill(0);

    // Many requests in flight at once: each answered once, with its data.
    let mut expected = HashMap::new();
    for i in 0..64u64 {
        let offset = (i * 200_003) % (size - 65536);
        let len = 4096 + (i as u32 % 16) * 4096;
        client.request(CMD_READ, 0, 1000 + i, offset, len);
        expected.insert(1000 + i, (offset as usize, len as usize));
    }
    for _ in 0..64 {
        let (handle, error) = client.reply();
        assert_eq!(error, 0);
        let (offset, len) = expected.remove(&handle).expect("a pending handle, once");
        assert!(
            client.bytes(len) == model[offset..][..len],
            "read {handle} at {offset}"
        );
    }
    client.request(CMD_DISC, 0, 99, 0, 0);
    assert!(client.is_closed());
}

#[test]
fn broken_streams_close_their_connection_and_nothing_else() {
    let s = setup();
    let (mut bystander, size) = RawClient::unix(&s.socket).transmitting();

    // A bad request magic: the stream cannot be trusted after it.
    let (mut client, _) = RawClient::unix(&s.socket).transmitting();
    client.send(&[0xee; 28]);
    assert!(client.is_closed());

    // A write larger than the maximum is answered, then hung up on (its
    // payload is not read).
    let (mut client, _) = RawClient::unix(&s.socket).transmitting();
    client.request(CMD_WRITE, 0, 1, 0, 64 << 20);
    assert_eq!(client.reply(), (1, EINVAL));
    assert!(client.is_closed());

    // A client that leaves halfway through a write's payload, with reads
    // pending, and one that leaves halfway through a header.
    for _ in 0..3 {
        let (mut client, _) = RawClient::unix(&s.socket).transmitting();
        client.request(CMD_READ, 0, 1, 0, 1 << 20);
        client.request(CMD_WRITE, 0, 2, 0, 1 << 20);
        client.send(&vec![0x77; 300 << 10]);
        drop(client);
        let (mut client, _) = RawClient::unix(&s.socket).transmitting();
        client.send(&[0x25, 0x60, 0x95, 0x13, 0, 0]);
        drop(client);
    }
    // The half-sent write never happened.
    let head = bystander.read(5, 0, 1 << 20).unwrap();
    assert!(head == s.image[..1 << 20]);
    still_serves(&mut bystander, &s.image);
    assert_eq!(size, s.image.len() as u64);

    // The daemon still answers its control socket, and new clients.
    let list = run(s.world.lazyblk().args(["list", "--json"]));
    assert!(String::from_utf8_lossy(&list.stdout).contains("\"live\""));
    let (mut late, _) = RawClient::unix(&s.socket).transmitting();
    still_serves(&mut late, &s.image);
    assert!(s.device.is_alive());
}
