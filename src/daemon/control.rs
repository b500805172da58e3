//! The control socket: one JSON request line, one JSON response line.
//!
//! Either side reads at most [`MAX_LINE`] bytes of a line, so a peer that
//! never sends a newline costs a bounded buffer, not all of memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::engine::EngineStats;

/// The longest line either side accepts, newline included. A stats answer
/// is well under a kilobyte; anything near this is not from a lazyblk peer.
pub const MAX_LINE: usize = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Stats,
    /// Flush and detach the device; refused while it is in use, unless
    /// `force` (absent in requests from older clients: not forced).
    Stop {
        #[serde(default)]
        force: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", content = "value", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Boxed: the counters outweigh every other answer many times.
    Stats(Box<EngineStats>),
    Stopping,
    Error(String),
}

/// What the control socket asks of a device.
#[async_trait]
pub trait DeviceControl: Send + Sync {
    fn stats(&self) -> EngineStats;
    /// Flushes and detaches; `force` detaches even a device in use. `Ok`
    /// means the device will exit.
    async fn stop(&self, force: bool) -> Result<(), String>;
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("connect to device socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talk to device socket {path}")]
    Exchange {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device socket {path} answered something unreadable: {answer:?}")]
    BadAnswer { path: PathBuf, answer: String },
    #[error("device socket {path} answered a line longer than {MAX_LINE} bytes")]
    AnswerTooLong { path: PathBuf },
}

/// One line of at most [`MAX_LINE`] bytes (the last may end at end of
/// input rather than a newline); `None` if it is longer.
async fn read_line(read: impl AsyncRead + Unpin) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    BufReader::new(read.take(MAX_LINE as u64))
        .read_until(b'\n', &mut line)
        .await?;
    let whole = line.len() < MAX_LINE || line.ends_with(b"\n");
    Ok(whole.then_some(line))
}

/// Sends one request and waits for its answer.
pub async fn request(socket: &Path, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let exchange = |source| ControlError::Exchange {
        path: socket.to_owned(),
        source,
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(req).expect("requests always serialise");
    line.push('\n');
    write.write_all(line.as_bytes()).await.map_err(exchange)?;
    let Some(answer) = read_line(read).await.map_err(exchange)? else {
        return Err(ControlError::AnswerTooLong {
            path: socket.to_owned(),
        });
    };
    serde_json::from_slice(&answer).map_err(|_| ControlError::BadAnswer {
        path: socket.to_owned(),
        answer: String::from_utf8_lossy(&answer).into_owned(),
    })
}

/// Answers control requests on `listener` until the task is dropped.
pub async fn serve_control(listener: UnixListener, device: Arc<dyn DeviceControl>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                continue;
            }
        };
        let device = device.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let Ok(line) = read_line(read).await else {
                return;
            };
            let response = match line.map(|l| serde_json::from_slice::<ControlRequest>(&l)) {
                Some(Ok(ControlRequest::Stats)) => ControlResponse::Stats(Box::new(device.stats())),
                Some(Ok(ControlRequest::Stop { force })) => match device.stop(force).await {
                    Ok(()) => ControlResponse::Stopping,
                    Err(e) => ControlResponse::Error(e),
                },
                Some(Err(e)) => ControlResponse::Error(format!("unreadable request: {e}")),
                None => {
                    ControlResponse::Error(format!("request line longer than {MAX_LINE} bytes"))
                }
            };
            let mut answer = serde_json::to_string(&response).expect("responses always serialise");
            answer.push('\n');
            let _ = write.write_all(answer.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;

    struct Idle;

    #[async_trait]
    impl DeviceControl for Idle {
        fn stats(&self) -> EngineStats {
            EngineStats::default()
        }
        async fn stop(&self, _force: bool) -> Result<(), String> {
            Err("in use".into())
        }
    }

    /// A device answering on a fresh socket; the guard keeps its directory.
    fn device() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(serve_control(listener, Arc::new(Idle)));
        (dir, path)
    }

    /// Sends `bytes` without closing the sending side (a peer that is still
    /// "typing") and returns the answer line.
    async fn raw_exchange(path: &Path, bytes: Vec<u8>) -> String {
        let (read, mut write) = UnixStream::connect(path).await.unwrap().into_split();
        // Written on its own task: past the limit the device stops reading,
        // and what it leaves unread may not fit in the socket's buffer.
        let writer = tokio::spawn(async move {
            let _ = write.write_all(&bytes).await;
            write
        });
        let mut answer = String::new();
        let mut reader = BufReader::new(read);
        let reading = reader.read_line(&mut answer);
        tokio::time::timeout(Duration::from_secs(10), reading)
            .await
            .expect("the device answers without waiting for a newline")
            .unwrap();
        drop(writer);
        answer
    }

    #[tokio::test]
    async fn a_request_line_of_the_limit_is_read_and_a_longer_one_refused() {
        let (_dir, path) = device();
        let line = |len: usize| {
            let mut l = br#"{"op":"stats"}"#.to_vec();
            l.resize(len - 1, b' ');
            l.push(b'\n');
            l
        };
        let answer = raw_exchange(&path, line(MAX_LINE)).await;
        assert!(matches!(
            serde_json::from_str(&answer).unwrap(),
            ControlResponse::Stats(_)
        ));

        let answer = raw_exchange(&path, line(MAX_LINE + 1)).await;
        let ControlResponse::Error(e) = serde_json::from_str(&answer).unwrap() else {
            panic!("{answer}");
        };
        assert!(e.contains("longer than 65536 bytes"), "{e}");

        // No newline at all, and the client never hangs up.
        let answer = raw_exchange(&path, vec![b'x'; 4 * MAX_LINE]).await;
        assert!(answer.contains("longer than"), "{answer}");

        // The device still serves ordinary requests.
        let stats = request(&path, &ControlRequest::Stats).await.unwrap();
        assert!(matches!(stats, ControlResponse::Stats(_)), "{stats:?}");
    }

    #[tokio::test]
    async fn an_endless_answer_is_an_error_not_a_growing_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut request = String::new();
            BufReader::new(read).read_line(&mut request).await.unwrap();
            let _ = write.write_all(&vec![b'x'; 4 * MAX_LINE]).await;
            // Held open: the answer never ends.
            std::future::pending::<()>().await;
        });
        let asked = request(&path, &ControlRequest::Stats);
        let err = tokio::time::timeout(Duration::from_secs(10), asked)
            .await
            .expect("the client gives up at the limit")
            .unwrap_err();
        assert!(matches!(err, ControlError::AnswerTooLong { .. }), "{err}");
        assert!(err.to_string().contains("65536"), "{err}");
    }

    #[test]
    fn a_stop_without_force_from_an_older_client_is_not_forced() {
        let request: ControlRequest = serde_json::from_str(r#"{"op":"stop"}"#).unwrap();
        assert!(matches!(request, ControlRequest::Stop { force: false }));
        let forced = serde_json::to_string(&ControlRequest::Stop { force: true }).unwrap();
        assert!(matches!(
            serde_json::from_str(&forced).unwrap(),
            ControlRequest::Stop { force: true }
        ));
    }
}
