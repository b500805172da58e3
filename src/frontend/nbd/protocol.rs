//! The NBD wire format (fixed newstyle handshake, simple replies): magic
//! numbers, option and command codes, and the fixed-size messages, parsed
//! and encoded without I/O so they can be tested and fuzzed alone.
//!
//! Every integer on the wire is big-endian.

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the server speaks newstyle; also the prefix of every option.
pub const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// The prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// Information items of `NBD_OPT_INFO` and `NBD_OPT_GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error values of the protocol (the common errnos, fixed by the spec).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Bytes of a request header and a simple reply header.
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of an option header after its magic (option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// A transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    /// A type this server does not implement (answered with EINVAL).
    Unknown(u16),
}

impl Command {
    fn from_wire(code: u16) -> Command {
        match code {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            other => Command::Unknown(other),
        }
    }

    /// The command flags this command may carry; any other is EINVAL. FUA
    /// is accepted on every command, as the protocol requires once
    /// SEND_FUA is negotiated (some clients set it on flushes); it only
    /// acts where a command changes data.
    pub fn allowed_flags(self) -> u16 {
        match self {
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            Command::Read
            | Command::Write
            | Command::Trim
            | Command::Flush
            | Command::Disconnect => CMD_FLAG_FUA,
            Command::Unknown(_) => 0,
        }
    }
}

/// A request header, as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    /// The client's tag, echoed in the reply.
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// A request header whose magic is wrong: the stream cannot be trusted
/// after it, so the connection ends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("request magic {0:#010x} is not NBD_REQUEST_MAGIC")]
pub struct BadRequestMagic(pub u32);

impl RequestHeader {
    pub fn parse(bytes: &[u8; REQUEST_LEN]) -> Result<RequestHeader, BadRequestMagic> {
        let magic = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(BadRequestMagic(magic));
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes(bytes[4..6].try_into().expect("2 bytes")),
            command: Command::from_wire(u16::from_be_bytes(
                bytes[6..8].try_into().expect("2 bytes"),
            )),
            handle: u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(bytes[16..24].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(bytes[24..28].try_into().expect("4 bytes")),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let code = match self.command {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
            Command::Unknown(code) => code,
        };
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        bytes[4..6].copy_from_slice(&self.flags.to_be_bytes());
        bytes[6..8].copy_from_slice(&code.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.handle.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.offset.to_be_bytes());
        bytes[24..28].copy_from_slice(&self.length.to_be_bytes());
        bytes
    }
}

/// The header of a simple reply; a successful read's data follows it.
pub fn simple_reply(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut bytes = [0u8; SIMPLE_REPLY_LEN];
    bytes[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    bytes[4..8].copy_from_slice(&error.to_be_bytes());
    bytes[8..16].copy_from_slice(&handle.to_be_bytes());
    bytes
}

/// An option reply: header and data in one buffer.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(20 + data.len());
    bytes.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&option.to_be_bytes());
    bytes.extend_from_slice(&reply.to_be_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// The protocol's error value for an errno from
/// [`crate::error::ErrorKind::errno`]. A refused write is EPERM, as the
/// spec asks of read-only exports; errnos the protocol lacks become EIO.
pub fn error_value(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::EOPNOTSUPP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// The name and information items of `NBD_OPT_INFO`/`NBD_OPT_GO` data.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub items: Vec<u16>,
}

/// Why option data was refused (answered with `NBD_REP_ERR_INVALID`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadOption {
    #[error("option data of {0} bytes is too short")]
    Truncated(usize),
    #[error("option data has {0} bytes after its last field")]
    Trailing(usize),
    #[error("export name is not UTF-8")]
    NameNotUtf8,
}

impl InfoRequest {
    pub fn parse(data: &[u8]) -> Result<InfoRequest, BadOption> {
        let truncated = || BadOption::Truncated(data.len());
        let name_len = data
            .get(..4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or_else(truncated)?;
        let name = data.get(4..4 + name_len).ok_or_else(truncated)?;
        let name = std::str::from_utf8(name)
            .map_err(|_| BadOption::NameNotUtf8)?
            .to_owned();
        let rest = &data[4 + name_len..];
        let count = rest
            .get(..2)
            .map(|b| u16::from_be_bytes(b.try_into().expect("2 bytes")) as usize)
            .ok_or_else(truncated)?;
        let items_bytes = rest.get(2..2 + 2 * count).ok_or_else(truncated)?;
        if rest.len() > 2 + 2 * count {
            return Err(BadOption::Trailing(rest.len() - 2 - 2 * count));
        }
        let items = items_bytes
            .chunks_exact(2)
            .map(|b| u16::from_be_bytes(b.try_into().expect("2 bytes")))
            .collect();
        Ok(InfoRequest { name, items })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_header_round_trips_and_a_bad_magic_is_refused() {
        let header = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::parse(&bytes), Ok(header));
        let mut bad = bytes;
        bad[0] = 0;
        assert_eq!(
            RequestHeader::parse(&bad),
            Err(BadRequestMagic(0x0060_9513))
        );
        let unknown = RequestHeader {
            command: Command::Unknown(42),
            ..header
        };
        assert_eq!(RequestHeader::parse(&unknown.encode()), Ok(unknown));
    }

    #[test]
    fn info_data_parses_and_malformed_data_is_refused() {
        let mut data = vec![0, 0, 0, 3];
        data.extend_from_slice(b"app");
        data.extend_from_slice(&[0, 2, 0, 3, 0, 1]);
        assert_eq!(
            InfoRequest::parse(&data),
            Ok(InfoRequest {
                name: "app".into(),
                items: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        assert_eq!(
            InfoRequest::parse(&data[..data.len() - 1]),
            Err(BadOption::Truncated(data.len() - 1))
        );
        let mut trailing = data.clone();
        trailing.push(9);
        assert_eq!(InfoRequest::parse(&trailing), Err(BadOption::Trailing(1)));
        // A name longer than the data.
        assert_eq!(
            InfoRequest::parse(&[0, 0, 1, 0, b'a']),
            Err(BadOption::Truncated(5))
        );
        assert_eq!(
            InfoRequest::parse(&[0, 0, 0, 1, 0xff, 0, 0]),
            Err(BadOption::NameNotUtf8)
        );
    }

    #[test]
    fn errnos_map_onto_the_protocols_values() {
        assert_eq!(error_value(libc::EROFS), EPERM);
        assert_eq!(error_value(libc::EIO), EIO);
        assert_eq!(error_value(libc::EINVAL), EINVAL);
        assert_eq!(error_value(libc::EOPNOTSUPP), ENOTSUP);
        assert_eq!(error_value(libc::ENOENT), EIO);
    }

    #[test]
    fn option_replies_carry_their_length() {
        let reply = option_reply(OPT_LIST, REP_SERVER, b"abc");
        assert_eq!(&reply[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&reply[16..20], &3u32.to_be_bytes());
        assert_eq!(&reply[20..], b"abc");
    }
}
