//! NBD fixtures: an image flattened from an OCI layout and pushed, `add
//! --nbd` devices that are stopped on drop, and a raw protocol client for
//! what real clients never send. The client's constants are written from
//! the protocol's text, not taken from the crate, so it checks the server.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::layout::{write_layout, Item};
use super::{pseudo_random, run, World};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// An image flattened from a two-layer OCI layout and pushed as `name`;
/// returns the image file.
pub fn pushed_image(world: &World, name: &str) -> PathBuf {
    let layers = vec![
        vec![
            Item::Dir("data"),
            Item::File("data/big.bin".into(), pseudo_random(1, 3 << 20), 0o644),
            Item::File("data/small.txt".into(), b"hello".to_vec(), 0o600),
        ],
        (0..40)
            .map(|i| {
                Item::File(
                    format!("data/f{i}.bin"),
                    pseudo_random(i + 10, 20_000),
                    0o644,
                )
            })
            .collect(),
    ];
    let layout = write_layout(&world.path("layout"), &layers);
    let image = world.path("flat.ext4");
    run(world
        .lazyblk()
        .arg("flatten")
        .arg(format!("oci:{}:t", layout.display()))
        .arg("-o")
        .arg(&image)
        .args(["--free-space", "8M"]));
    world.push(&image, name);
    image
}

/// A device added with `--nbd`, stopped (forcibly) when dropped.
pub struct NbdDevice {
    pub uri: String,
    /// The listener as `del --nbd` takes it (a TCP port resolved).
    pub listener: String,
    pub pid: u32,
    run_dir: PathBuf,
}

impl NbdDevice {
    /// `add --nbd LISTENER EXTRA…` for image `name` with cache `cache`.
    pub fn add(
        world: &World,
        name: &str,
        cache: &str,
        listener: &str,
        extra: &[&str],
    ) -> NbdDevice {
        let out = run(world
            .with_store("add")
            .args(["--name", name, "--cache-dir"])
            .arg(world.path(cache))
            .args(["--nbd", listener])
            .args(extra));
        let said = String::from_utf8(out.stdout).unwrap();
        let uri = said.split_whitespace().next().expect("a URI").to_owned();
        let pid = said
            .split("(pid ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {said:?}"));
        let listener = match listener.strip_prefix("tcp:") {
            Some(_) => format!("tcp:{}", tcp_addr(&uri)),
            None => listener.to_owned(),
        };
        NbdDevice {
            uri,
            listener,
            pid,
            run_dir: world.run_dir(),
        }
    }

    /// The `HOST:PORT` of a TCP export.
    pub fn addr(&self) -> String {
        tcp_addr(&self.uri)
    }

    pub fn is_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

fn tcp_addr(uri: &str) -> String {
    let rest = uri.split("://").nth(1).expect("a URI with a scheme");
    rest.split('/').next().unwrap().to_owned()
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new(super::lazyblk_bin())
            .env("LAZYBLK_RUN_DIR", &self.run_dir)
            .args(["del", "--force", "--nbd", &self.listener])
            .output();
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A hand-driven NBD client.
pub struct RawClient {
    stream: Box<dyn Stream>,
}

impl RawClient {
    /// Connects to a Unix socket and reads the greeting.
    pub fn unix(path: &Path) -> RawClient {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        RawClient::greeted(Box::new(stream))
    }

    pub fn tcp(addr: &str) -> RawClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        RawClient::greeted(Box::new(stream))
    }

    fn greeted(stream: Box<dyn Stream>) -> RawClient {
        let mut client = RawClient { stream };
        assert_eq!(client.u64(), NBDMAGIC);
        assert_eq!(client.u64(), IHAVEOPT);
        let flags = client.u16();
        assert_eq!(flags & 1, 1, "fixed newstyle offered");
        client
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    /// Fixed newstyle, no zero padding.
    pub fn client_flags(&mut self) {
        self.send(&3u32.to_be_bytes());
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        self.send(&bytes);
    }

    /// One option reply: its type and data.
    pub fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.u64(), REPLY_MAGIC);
        assert_eq!(self.u32(), option, "reply to the option sent");
        let kind = self.u32();
        let len = self.u32() as usize;
        (kind, self.bytes(len))
    }

    /// `NBD_OPT_GO` for `name`: the export's size and transmission flags,
    /// or the error reply type.
    pub fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &data);
        let mut export = None;
        loop {
            match self.option_reply(OPT_GO) {
                (REP_INFO, info) if info[..2] == [0, 0] => {
                    let size = u64::from_be_bytes(info[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes(info[10..12].try_into().unwrap());
                    export = Some((size, flags));
                }
                (REP_INFO, _) => {}
                (REP_ACK, _) => return Ok(export.expect("NBD_INFO_EXPORT before the ACK")),
                (error, _) => return Err(error),
            }
        }
    }

    /// A client at transmission for the default export; its size.
    pub fn transmitting(mut self) -> (RawClient, u64) {
        self.client_flags();
        let (size, _) = self.go("").expect("GO accepted");
        (self, size)
    }

    pub fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        let mut bytes = 0x2560_9513u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&command.to_be_bytes());
        bytes.extend_from_slice(&handle.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&len.to_be_bytes());
        self.send(&bytes);
    }

    /// A simple reply's handle and error.
    pub fn reply(&mut self) -> (u64, u32) {
        assert_eq!(self.u32(), 0x6744_6698, "simple reply magic");
        let error = self.u32();
        (self.u64(), error)
    }

    /// A read, and its data or error.
    pub fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, handle, offset, len);
        let (got, error) = self.reply();
        assert_eq!(got, handle);
        match error {
            0 => Ok(self.bytes(len as usize)),
            error => Err(error),
        }
    }

    /// A write (`flags` may ask for FUA); its error, 0 on success.
    pub fn write(&mut self, handle: u64, flags: u16, offset: u64, data: &[u8]) -> u32 {
        self.request(CMD_WRITE, flags, handle, offset, data.len() as u32);
        self.send(data);
        let (got, error) = self.reply();
        assert_eq!(got, handle);
        error
    }

    /// Whether the server closed the connection (reads end of stream).
    pub fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("waiting for the server to close: {e}"),
            }
        }
    }
}
