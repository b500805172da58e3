//! The NBD frontend: the engine as one export of a Network Block Device
//! server, on a Unix socket or a TCP address, for QEMU, the libnbd tools,
//! other hosts and kernels without ublk.
//!
//! The protocol code is ours (`protocol.rs`: the wire format; `handshake.rs`:
//! fixed newstyle option haggling and STARTTLS; `transmission.rs`: the
//! request loop). Each request becomes one engine [`Request`](crate::engine::Request),
//! completed on the connection's task when the cache and the page cache
//! hold its bytes, else on the blocking pool, so a cold chunk holds up only
//! the requests that need it;
//! replies go out in the order requests complete, through one writer per
//! connection. All connections share the engine, so a flush on any of them
//! covers writes completed on every one (`NBD_FLAG_CAN_MULTI_CONN`).

mod handshake;
pub mod protocol;
mod transmission;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::engine::Engine;
use crate::net::tls::TlsError;

/// The largest read or write served in one request (the block size
/// advertised as maximum); larger ones get EINVAL.
pub const MAX_REQUEST_BYTES: u32 = 32 << 20;
/// How long a client may take over the handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the accept loop pauses after a failed accept (out of file
/// descriptors, say) before it tries again.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Where the server listens: `unix:PATH` or `tcp:ADDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Listen, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/app.sock".into());
            }
            Ok(Listen::Unix(PathBuf::from(path)))
        } else if let Some(addr) = text.strip_prefix("tcp:") {
            addr.parse().map(Listen::Tcp).map_err(|e| {
                format!("{addr:?} is not an IP address and port, e.g. tcp:127.0.0.1:10809 ({e})")
            })
        } else {
            Err(format!(
                "{text:?} names no NBD listener: say unix:PATH or tcp:ADDR:PORT"
            ))
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
            Listen::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("listen on {listen}")]
    Bind {
        listen: Listen,
        #[source]
        source: std::io::Error,
    },
    #[error("{connections} NBD client(s) connected: disconnect them first, or force")]
    Busy { connections: usize },
}

/// Why one connection ended early; logged, never fatal to the server.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("connection I/O")]
    Io(#[from] std::io::Error),
    #[error("handshake took longer than {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("client flags {0:#x} include flags this server does not know")]
    UnknownClientFlags(u32),
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    #[error("option {option} carries {len} bytes of data, more than the {limit} allowed")]
    OptionTooLong { option: u32, len: u32, limit: u32 },
    #[error("NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS")]
    TlsRequired,
    #[error("NBD_OPT_EXPORT_NAME asks for export {0:?}, which is not served here")]
    UnknownExport(String),
    #[error(transparent)]
    BadRequestMagic(#[from] protocol::BadRequestMagic),
    #[error("write of {0} bytes is larger than the {MAX_REQUEST_BYTES}-byte maximum")]
    OversizedWrite(u32),
}

/// What the server serves: the engine, under one export name.
pub struct Export {
    pub engine: Arc<Engine>,
    /// The export's name; clients may also ask for the default export, "".
    pub name: String,
    /// With TLS configured, every client must upgrade with STARTTLS first.
    pub tls: Option<TlsAcceptor>,
}

impl Export {
    fn knows(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }
}

/// A TLS acceptor for the certificate chain and key in `cert` and `key`
/// (PEM; the key refused if others may read it), loaded as the chunk
/// server loads them. NBD names no ALPN protocol, so none is offered.
/// With `client_ca`, a client must present a certificate that chains to it
/// (NBD has no other client authentication).
pub fn tls_acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, TlsError> {
    let mut config = crate::net::tls::server_config_verifying_clients(cert, key, client_ca)?
        .as_ref()
        .clone();
    config.alpn_protocols.clear();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A listening NBD server; [`NbdServer::run`] serves it until
/// [`NbdHandle::stop`].
pub struct NbdServer {
    listener: Listener,
    listen: Listen,
    export: Arc<Export>,
    handle: NbdHandle,
}

/// Watches and stops a running server from elsewhere.
#[derive(Clone)]
pub struct NbdHandle {
    stop: Arc<watch::Sender<bool>>,
    connections: Arc<AtomicUsize>,
}

impl NbdHandle {
    /// Clients connected now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Stops accepting; refused while clients are connected unless
    /// `force`, which cuts them off (their unanswered requests are lost,
    /// as with a pulled cable).
    pub fn stop(&self, force: bool) -> Result<(), NbdError> {
        let connections = self.connections();
        if connections > 0 && !force {
            return Err(NbdError::Busy { connections });
        }
        self.stop.send_replace(true);
        Ok(())
    }
}

impl NbdServer {
    /// Listens at `listen`. A stale socket file at a Unix path is replaced;
    /// a live one, or any other file there, is refused
    /// ([`crate::socket::bind_replacing_stale`]).
    pub async fn bind(listen: &Listen, export: Export) -> Result<NbdServer, NbdError> {
        let bind_error = |source| NbdError::Bind {
            listen: listen.clone(),
            source,
        };
        let (listener, bound) = match listen {
            Listen::Unix(path) => {
                // Whoever can connect reads the image's plaintext: the
                // owner alone, as for the cache; chmod to share it.
                let listener = crate::socket::bind_replacing_stale(path, UnixListener::bind)
                    .map_err(bind_error)?;
                (Listener::Unix(listener, path.clone()), listen.clone())
            }
            Listen::Tcp(addr) => {
                let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
                let bound = listener.local_addr().map_err(bind_error)?;
                (Listener::Tcp(listener), Listen::Tcp(bound))
            }
        };
        Ok(NbdServer {
            listener,
            listen: bound,
            export: Arc::new(export),
            handle: NbdHandle {
                stop: Arc::new(watch::Sender::new(false)),
                connections: Arc::new(AtomicUsize::new(0)),
            },
        })
    }

    /// Where the server listens (a TCP port 0 resolved to the real port).
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// The URI clients name the export by (libnbd and QEMU syntax).
    pub fn uri(&self) -> String {
        let tls = if self.export.tls.is_some() { "s" } else { "" };
        match &self.listen {
            Listen::Unix(path) => format!(
                "nbd{tls}+unix:///{}?socket={}",
                self.export.name,
                path.display()
            ),
            Listen::Tcp(addr) => format!("nbd{tls}://{addr}/{}", self.export.name),
        }
    }

    pub fn handle(&self) -> NbdHandle {
        self.handle.clone()
    }

    /// Accepts and serves clients, each on its own task, until stopped.
    pub async fn run(self) {
        let mut stopped = self.handle.stop.subscribe();
        loop {
            let accepted = tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => break,
                accepted = accept(&self.listener) => accepted,
            };
            match accepted {
                Ok(Accepted::Unix(stream)) => self.spawn_connection(stream, "unix".into()),
                Ok(Accepted::Tcp(stream, peer)) => {
                    // Replies are small and latency-bound.
                    let _ = stream.set_nodelay(true);
                    self.spawn_connection(stream, peer.to_string());
                }
                Err(e) => {
                    tracing::warn!("accept NBD client on {}: {e}", self.listen);
                    tokio::time::sleep(ACCEPT_RETRY_PAUSE).await;
                }
            }
        }
        if let Listener::Unix(_, path) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
    }

    fn spawn_connection<S>(&self, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let export = self.export.clone();
        let mut stopped = self.handle.stop.subscribe();
        let connected = Connected::count(&self.handle.connections);
        tokio::spawn(async move {
            let _connected = connected;
            tracing::debug!(peer, "NBD client connected");
            tokio::select! {
                ended = handshake::serve_connection(stream, export) => match ended {
                    Ok(()) => tracing::debug!(peer, "NBD client disconnected"),
                    Err(e) => tracing::info!(peer, "NBD client dropped: {}", crate::error::chain(&e)),
                },
                _ = stopped.wait_for(|stop| *stop) => tracing::info!(peer, "NBD client cut off: server stopping"),
            }
        });
    }
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, SocketAddr),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Unix(listener, _) => listener
            .accept()
            .await
            .map(|(stream, _)| Accepted::Unix(stream)),
        Listener::Tcp(listener) => listener
            .accept()
            .await
            .map(|(stream, peer)| Accepted::Tcp(stream, peer)),
    }
}

/// Counts one connection for as long as it lives.
struct Connected(Arc<AtomicUsize>);

impl Connected {
    fn count(counter: &Arc<AtomicUsize>) -> Connected {
        counter.fetch_add(1, Ordering::Relaxed);
        Connected(counter.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs_parse_and_bad_ones_say_what_is_wrong() {
        assert_eq!(
            "unix:/run/a.sock".parse::<Listen>(),
            Ok(Listen::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse::<Listen>(),
            Ok(Listen::Tcp("127.0.0.1:10809".parse().unwrap()))
        );
        assert_eq!(
            "tcp:[::1]:1".parse::<Listen>().unwrap().to_string(),
            "tcp:[::1]:1"
        );
        assert!("unix:"
            .parse::<Listen>()
            .unwrap_err()
            .contains("socket path"));
        assert!("tcp:localhost"
            .parse::<Listen>()
            .unwrap_err()
            .contains("IP address"));
        assert!("/run/a.sock"
            .parse::<Listen>()
            .unwrap_err()
            .contains("unix:PATH"));
    }
}
