//! Fixed newstyle negotiation: greeting, option haggling, STARTTLS.
//!
//! Options are answered one at a time, as the protocol requires. With TLS
//! configured, every option before STARTTLS but ABORT is refused with
//! `NBD_REP_ERR_TLS_REQD` (and `NBD_OPT_EXPORT_NAME`, which cannot be
//! refused, ends the connection). Structured replies, metadata contexts
//! and extended headers are not offered: `NBD_REP_ERR_UNSUP`, as for any
//! option this server does not know, so clients fall back to simple
//! replies.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use super::protocol::*;
use super::{transmission, ConnectionError, Export, HANDSHAKE_TIMEOUT, MAX_REQUEST_BYTES};

/// Option data longer than this (a name is at most 4096 bytes, plus a few
/// fields) is a hostile client; the connection ends.
const MAX_OPTION_DATA: u32 = 8 << 10;
/// The block sizes advertised: any alignment works, 4 KiB is efficient.
const MIN_BLOCK: u32 = 1;
const PREFERRED_BLOCK: u32 = 4096;

/// How negotiation ended.
enum Negotiated {
    /// Enter transmission on this stream.
    Transmit,
    /// The client asked for TLS and was told yes: upgrade, then negotiate again.
    StartTls(TlsAcceptor),
    /// The client aborted.
    Aborted,
}

/// Serves one client from greeting to disconnect.
pub(super) async fn serve_connection<S>(
    mut stream: S,
    export: Arc<Export>,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (negotiated, no_zeroes) = within_handshake_time(async {
        let no_zeroes = greet(&mut stream).await?;
        let negotiated = negotiate(&mut stream, &export, false, no_zeroes).await?;
        Ok((negotiated, no_zeroes))
    })
    .await?;
    match negotiated {
        Negotiated::Transmit => transmission::serve(stream, export).await,
        Negotiated::Aborted => Ok(()),
        Negotiated::StartTls(acceptor) => {
            let (negotiated, mut stream) = within_handshake_time(async {
                let mut tls = acceptor.accept(stream).await?;
                let negotiated = negotiate(&mut tls, &export, true, no_zeroes).await?;
                Ok((negotiated, tls))
            })
            .await?;
            match negotiated {
                Negotiated::Transmit => transmission::serve(stream, export).await,
                // `negotiate` refuses a second STARTTLS, so this is an abort.
                Negotiated::Aborted | Negotiated::StartTls(_) => {
                    let _ = stream.shutdown().await;
                    Ok(())
                }
            }
        }
    }
}

async fn within_handshake_time<T>(
    step: impl std::future::Future<Output = Result<T, ConnectionError>>,
) -> Result<T, ConnectionError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, step)
        .await
        .map_err(|_| ConnectionError::HandshakeTimeout)?
}

/// Sends the greeting and reads the client's flags; returns whether the
/// client asked for no zero padding after `NBD_OPT_EXPORT_NAME`.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<bool, ConnectionError> {
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&INIT_MAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&OPTION_MAGIC.to_be_bytes());
    greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(ConnectionError::UnknownClientFlags(client_flags));
    }
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

/// The transmission flags of `export`.
fn transmission_flags(export: &Export) -> u16 {
    let common = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    if export.engine.read_only() {
        common | TFLAG_READ_ONLY
    } else {
        common | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
    }
}

async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    export: &Export,
    tls_active: bool,
    no_zeroes: bool,
) -> Result<Negotiated, ConnectionError> {
    let tls_required = export.tls.is_some() && !tls_active;
    loop {
        let magic = stream.read_u64().await?;
        if magic != OPTION_MAGIC {
            return Err(ConnectionError::BadOptionMagic(magic));
        }
        let option = stream.read_u32().await?;
        let len = stream.read_u32().await?;
        if len > MAX_OPTION_DATA {
            return Err(ConnectionError::OptionTooLong {
                option,
                len,
                limit: MAX_OPTION_DATA,
            });
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;

        let reply = |kind, data: &[u8]| option_reply(option, kind, data);
        let mut out = Vec::new();
        let mut outcome = None;
        match option {
            OPT_EXPORT_NAME => {
                if tls_required {
                    return Err(ConnectionError::TlsRequired);
                }
                let name = String::from_utf8_lossy(&data);
                if !export.knows(&name) {
                    return Err(ConnectionError::UnknownExport(name.into_owned()));
                }
                out.extend_from_slice(&export.engine.size().to_be_bytes());
                out.extend_from_slice(&transmission_flags(export).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                outcome = Some(Negotiated::Transmit);
            }
            OPT_ABORT => {
                out = reply(REP_ACK, &[]);
                outcome = Some(Negotiated::Aborted);
            }
            OPT_STARTTLS => match (&export.tls, tls_active) {
                (None, _) => out = reply(REP_ERR_UNSUP, b"this server has no TLS configured"),
                (Some(_), true) => out = reply(REP_ERR_INVALID, b"TLS is already running"),
                (Some(_), false) if !data.is_empty() => {
                    out = reply(REP_ERR_INVALID, b"STARTTLS carries no data")
                }
                (Some(acceptor), false) => {
                    out = reply(REP_ACK, &[]);
                    outcome = Some(Negotiated::StartTls(acceptor.clone()));
                }
            },
            _ if tls_required => {
                out = reply(REP_ERR_TLS_REQD, b"this server requires STARTTLS first")
            }
            OPT_LIST if !data.is_empty() => out = reply(REP_ERR_INVALID, b"LIST carries no data"),
            OPT_LIST => {
                let mut server = (export.name.len() as u32).to_be_bytes().to_vec();
                server.extend_from_slice(export.name.as_bytes());
                out = reply(REP_SERVER, &server);
                out.extend(reply(REP_ACK, &[]));
            }
            OPT_INFO | OPT_GO => match InfoRequest::parse(&data) {
                Err(e) => out = reply(REP_ERR_INVALID, e.to_string().as_bytes()),
                Ok(request) if !export.knows(&request.name) => {
                    let text = format!(
                        "no export named {:?}; this server has {:?}",
                        request.name, export.name
                    );
                    out = reply(REP_ERR_UNKNOWN, text.as_bytes());
                }
                Ok(request) => {
                    out = info_replies(option, export, &request.items);
                    if option == OPT_GO {
                        outcome = Some(Negotiated::Transmit);
                    }
                }
            },
            _ => out = reply(REP_ERR_UNSUP, &[]),
        }
        stream.write_all(&out).await?;
        stream.flush().await?;
        if let Some(outcome) = outcome {
            return Ok(outcome);
        }
    }
}

/// The replies to `NBD_OPT_INFO`/`NBD_OPT_GO`: the export's size and flags
/// always, its name and block sizes when asked, then the final ACK.
fn info_replies(option: u32, export: &Export, items: &[u16]) -> Vec<u8> {
    let mut export_info = INFO_EXPORT.to_be_bytes().to_vec();
    export_info.extend_from_slice(&export.engine.size().to_be_bytes());
    export_info.extend_from_slice(&transmission_flags(export).to_be_bytes());
    let mut out = option_reply(option, REP_INFO, &export_info);
    if items.contains(&INFO_NAME) {
        let mut name = INFO_NAME.to_be_bytes().to_vec();
        name.extend_from_slice(export.name.as_bytes());
        out.extend(option_reply(option, REP_INFO, &name));
    }
    if items.contains(&INFO_BLOCK_SIZE) {
        let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for size in [MIN_BLOCK, PREFERRED_BLOCK, MAX_REQUEST_BYTES] {
            sizes.extend_from_slice(&size.to_be_bytes());
        }
        out.extend(option_reply(option, REP_INFO, &sizes));
    }
    out.extend(option_reply(option, REP_ACK, &[]));
    out
}
