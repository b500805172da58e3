//! A reader that runs its source on a thread of its own.
//!
//! Decompressing a gzip layer costs about as much CPU as everything the
//! flattener does with the bytes, so the two run side by side: the pump
//! thread reads (and so decompresses and verifies) ahead into a bounded queue
//! of buffers while the caller consumes them. Bytes and errors arrive in the
//! order the source produced them; nothing is read past the first error.
//!
//! The pump fills whole buffers and the reader sends each emptied one back
//! to be filled again: a decoder yields only tens of KiB per call, and a
//! fresh zeroed megabyte per call took more of the pump thread's time than
//! a third of the inflating itself.

use std::io::{self, Read};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::thread::JoinHandle;

/// Bytes per buffer handed from the pump thread to the reader.
const BUFFER_BYTES: usize = 1 << 20;
/// Buffers the pump thread may read ahead.
const BUFFERS_AHEAD: usize = 4;

/// Reads `source` on its own thread; see the module docs.
pub struct PumpedReader {
    /// Declared before `thread` so dropping the reader first disconnects the
    /// queue, which ends the pump's next send, then joins it.
    queue: Receiver<io::Result<Vec<u8>>>,
    /// Emptied buffers on their way back to the pump.
    spent: Sender<Vec<u8>>,
    current: Vec<u8>,
    offset: usize,
    done: bool,
    thread: Option<JoinHandle<()>>,
}

impl PumpedReader {
    pub fn new(mut source: Box<dyn Read + Send>) -> io::Result<PumpedReader> {
        let (tx, queue) = sync_channel(BUFFERS_AHEAD);
        let (spent, recycled) = channel::<Vec<u8>>();
        let thread = std::thread::Builder::new()
            .name("layer-pump".into())
            .spawn(move || loop {
                // Only the first few buffers are allocated (and zeroed); a
                // returned one is cut back only when it held a source's
                // last bytes.
                let mut buffer = recycled
                    .try_recv()
                    .unwrap_or_else(|_| vec![0u8; BUFFER_BYTES]);
                buffer.resize(BUFFER_BYTES, 0);
                // Whole buffers, so a handoff (a wake-up of the reader)
                // carries a megabyte, not one decoder call's output.
                let mut filled = 0;
                let mut failure = None;
                while filled < BUFFER_BYTES {
                    match source.read(&mut buffer[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                        Err(err) => {
                            failure = Some(err);
                            break;
                        }
                    }
                }
                let ended = filled < BUFFER_BYTES;
                if filled > 0 {
                    buffer.truncate(filled);
                    if tx.send(Ok(buffer)).is_err() {
                        return;
                    }
                }
                if let Some(err) = failure {
                    let _ = tx.send(Err(err));
                    return;
                }
                if ended {
                    return;
                }
            })?;
        Ok(PumpedReader {
            queue,
            spent,
            current: Vec::new(),
            offset: 0,
            done: false,
            thread: Some(thread),
        })
    }
}

impl Read for PumpedReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.offset == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.queue.recv() {
                Ok(Ok(buffer)) => {
                    let spent = std::mem::replace(&mut self.current, buffer);
                    if spent.capacity() == BUFFER_BYTES {
                        // The pump may have ended; then the buffer is dropped.
                        let _ = self.spent.send(spent);
                    }
                    self.offset = 0;
                }
                Ok(Err(err)) => {
                    self.done = true;
                    return Err(err);
                }
                // The pump ended: the source reached its end.
                Err(_) => self.done = true,
            }
        }
        let n = out.len().min(self.current.len() - self.offset);
        out[..n].copy_from_slice(&self.current[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

impl Drop for PumpedReader {
    fn drop(&mut self) {
        // Unblock a pump waiting to send, then wait for it.
        let (_, empty) = sync_channel(0);
        drop(std::mem::replace(&mut self.queue, empty));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields `data` in odd-sized pieces, then `error` if given.
    struct Source {
        data: Vec<u8>,
        at: usize,
        error: bool,
    }

    impl Read for Source {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.at == self.data.len() {
                return if self.error {
                    Err(io::Error::other("digest mismatch"))
                } else {
                    Ok(0)
                };
            }
            let n = out.len().min(self.data.len() - self.at).min(777_777);
            out[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn data() -> Vec<u8> {
        (0..5_000_000u32).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn bytes_arrive_in_order_and_whole() {
        let source = Source {
            data: data(),
            at: 0,
            error: false,
        };
        let mut out = Vec::new();
        PumpedReader::new(Box::new(source))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == data());
    }

    #[test]
    fn an_error_arrives_after_the_bytes_before_it() {
        let source = Source {
            data: data(),
            at: 0,
            error: true,
        };
        let mut reader = PumpedReader::new(Box::new(source)).unwrap();
        let mut out = vec![0u8; data().len()];
        reader.read_exact(&mut out).unwrap();
        assert!(out == data());
        let err = reader.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(err.to_string(), "digest mismatch");
        assert_eq!(reader.read(&mut [0u8; 16]).unwrap(), 0);
    }

    #[test]
    fn dropping_early_stops_the_pump() {
        let source = Source {
            data: data(),
            at: 0,
            error: false,
        };
        let mut reader = PumpedReader::new(Box::new(source)).unwrap();
        reader.read_exact(&mut [0u8; 10]).unwrap();
        drop(reader);
    }
}
