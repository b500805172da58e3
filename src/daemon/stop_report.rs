//! What a device process has to tell the `del` that stopped it, once its
//! control socket is gone: a file beside its record, written just before
//! the process exits, read and removed by `del` once the process has.
//!
//! Only failures `del` must pass on are written (today: a recorded trace
//! run the store did not take), so a device stopped without trouble leaves
//! nothing behind. One stopped by a signal, with no `del` waiting, writes
//! its report all the same (it cannot tell who stopped it) and nobody reads
//! it; a device removes any report left under its pid by an earlier process
//! when it starts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The failures of a device's last moments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopReport {
    /// The image the device served.
    pub name: String,
    /// Why the trace run it recorded (`add --record-trace`) was not
    /// stored, the whole error chain.
    pub trace_error: String,
}

impl StopReport {
    fn path(run_dir: &Path, pid: u32) -> PathBuf {
        run_dir.join(format!("{pid}.stopped"))
    }

    /// Writes the report of device `pid`, durably (it must outlive the
    /// process) and readable by its owner alone, as records are.
    pub fn publish(&self, run_dir: &Path, pid: u32) -> std::io::Result<()> {
        crate::durable::write_with_mode(
            &Self::path(run_dir, pid),
            &serde_json::to_vec_pretty(self)?,
            crate::private::FILE_MODE,
        )
    }

    /// Takes (reads and removes) the report device `pid` left, if any. A
    /// report that does not parse is an error naming its file, never
    /// silence: it was written to be read.
    pub fn take(run_dir: &Path, pid: u32) -> std::io::Result<Option<StopReport>> {
        let path = Self::path(run_dir, pid);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Self::clear(run_dir, pid);
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("stop report {}: {e}", path.display()),
            )
        })
    }

    /// Removes whatever report is left under `pid`.
    pub fn clear(run_dir: &Path, pid: u32) {
        let _ = std::fs::remove_file(Self::path(run_dir, pid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(StopReport::take(dir.path(), 7).unwrap(), None);
        let report = StopReport {
            name: "app".into(),
            trace_error: "store trace run: 401".into(),
        };
        report.publish(dir.path(), 7).unwrap();
        assert_eq!(StopReport::take(dir.path(), 7).unwrap(), Some(report));
        assert_eq!(StopReport::take(dir.path(), 7).unwrap(), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        std::fs::write(dir.path().join("8.stopped"), b"{").unwrap();
        let err = StopReport::take(dir.path(), 8).unwrap_err();
        assert!(err.to_string().contains("8.stopped"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
