//! The control socket: one JSON request line, one JSON response line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::engine::EngineStats;

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
    Stats(EngineStats),
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
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(exchange)?;
    serde_json::from_str(&answer).map_err(|_| ControlError::BadAnswer {
        path: socket.to_owned(),
        answer,
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
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let response = match serde_json::from_str::<ControlRequest>(&line) {
                Ok(ControlRequest::Stats) => ControlResponse::Stats(device.stats()),
                Ok(ControlRequest::Stop { force }) => match device.stop(force).await {
                    Ok(()) => ControlResponse::Stopping,
                    Err(e) => ControlResponse::Error(e),
                },
                Err(e) => ControlResponse::Error(format!("unreadable request: {e}")),
            };
            let mut answer = serde_json::to_string(&response).expect("responses always serialise");
            answer.push('\n');
            let _ = write.write_all(answer.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
