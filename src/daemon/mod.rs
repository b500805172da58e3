//! What every running device shares, whatever its frontend: a record in the
//! run directory and a control socket that answers `stats` and `stop`.
//!
//! `lazyblk add` starts a device process; `lazyblk list` and `lazyblk del`
//! find it through the run directory (`/run/lazyblk`, or `$LAZYBLK_RUN_DIR`)
//! and talk to it over its socket, one JSON line each way.
//!
//! Invariant: a record whose socket does not answer belongs to a process
//! that is gone; readers clean it up, except for a ublk device the kernel
//! still has (an orphan, waiting for `recover` or `del`), whose record says
//! how to serve it again.

mod control;
pub mod metrics;
mod stop_report;

pub use control::{
    request, serve_control, ControlError, ControlRequest, ControlResponse, DeviceControl,
};
pub use stop_report::StopReport;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::EngineStats;
use crate::frontend::ublk::CopyMode;
use crate::store::ec::Scheme;

/// Where device records live unless `$LAZYBLK_RUN_DIR` says otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/lazyblk";

/// The run directory in effect.
pub fn run_dir() -> PathBuf {
    std::env::var_os("LAZYBLK_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

/// How a device is presented to the kernel. Records name it as a lowercase
/// string, so a record written before this type existed still reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontendKind {
    /// `MOUNTPOINT/disk` through FUSE, for kernels without ublk.
    Fuse,
    /// `/dev/ublkbN` through the kernel's ublk driver.
    Ublk,
    /// A virtio disk for VMs, served on a vhost-user socket.
    #[serde(rename = "vhost-user-blk")]
    VhostUserBlk,
    /// An NBD export on a Unix socket or TCP address.
    Nbd,
}

impl FrontendKind {
    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::Fuse => "fuse",
            FrontendKind::Ublk => "ublk",
            FrontendKind::VhostUserBlk => "vhost-user-blk",
            FrontendKind::Nbd => "nbd",
        }
    }
}

impl std::fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// What a running device says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub pid: u32,
    pub frontend: FrontendKind,
    /// Where the device is presented: a FUSE mountpoint, a block device
    /// path, a vhost-user socket or an NBD listener (`unix:PATH`,
    /// `tcp:ADDR:PORT`).
    pub target: PathBuf,
    pub name: String,
    pub store: String,
    pub cache_dir: PathBuf,
    pub read_only: bool,
    /// Where the device serves its Prometheus metrics, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<std::net::SocketAddr>,
    /// What a ublk device needs to be found and served again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ublk: Option<UblkRecord>,
}

/// The ublk side of a device record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UblkRecord {
    /// The driver's device number: `/dev/ublkbID`.
    pub id: u32,
    pub queues: u16,
    pub depth: u16,
    pub recoverable: bool,
    /// How request data moves (records written before it existed were all
    /// copy mode).
    #[serde(default = "copy_mode_before_zero_copy")]
    pub copy_mode: CopyMode,
    /// The store as it was named to `add` (reopened by `recover`); the
    /// origin, the last of `stores`, when it named several.
    pub store_spec: String,
    /// Every `--store` given to `add`, fastest first; empty in records
    /// written before tiers existed (then `store_spec` alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stores: Vec<String>,
    /// `--host-cache` as given to `add`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cache: Option<PathBuf>,
    /// `--host-cache-size` as given to `add` (ignored without a host cache).
    #[serde(default)]
    pub host_cache_size: u64,
    /// The `--token-file` the store was opened with; without one, `recover`
    /// takes the token from its own environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// `--http2-prior-knowledge` as given to `add`.
    #[serde(default)]
    pub http2_prior_knowledge: bool,
    /// `--tls-ca` as given to `add`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// `--s3-endpoint` as given to `add`; without one, `recover` takes the
    /// endpoint from its own environment, as it does the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// `--s3-path-style` as given to `add`.
    #[serde(default)]
    pub s3_path_style: bool,
    /// `--ec-cache` as given to `add`: the cache fleet's node URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec_cache: Option<String>,
    /// `--ec-shards` as given to `add`, with a fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec_shards: Option<Scheme>,
    /// `--metrics` as given to `add` (`recover` serves metrics there again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<std::net::SocketAddr>,
    /// The tenant key file the device was added with.
    pub key: PathBuf,
    pub readahead_chunks: u32,
    /// `--fetch-timeout` in seconds (records written before it existed
    /// get the default).
    #[serde(default = "default_fetch_timeout_secs")]
    pub fetch_timeout_secs: f64,
    /// The device's `UBLK_F_*` flags as the driver reported them at start;
    /// 0 in records written before they were kept.
    #[serde(default)]
    pub flags: u64,
}

impl UblkRecord {
    /// The stores `recover` opens, fastest first.
    pub fn store_specs(&self) -> Vec<String> {
        if self.stores.is_empty() {
            vec![self.store_spec.clone()]
        } else {
            self.stores.clone()
        }
    }
}

fn copy_mode_before_zero_copy() -> CopyMode {
    CopyMode::Copy
}

fn default_fetch_timeout_secs() -> f64 {
    crate::engine::DEFAULT_FETCH_TIMEOUT.as_secs_f64()
}

/// Whether a device's process answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Live,
    /// The process died; the kernel still has the ublk device.
    Orphaned,
}

/// A record with the live counters its device reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStatus {
    #[serde(flatten)]
    pub record: DeviceRecord,
    pub state: DeviceState,
    /// The live counters; none for an orphan.
    pub stats: Option<EngineStats>,
}

impl DeviceRecord {
    /// The control socket of the device with this pid.
    pub fn socket_path(run_dir: &Path, pid: u32) -> PathBuf {
        run_dir.join(format!("{pid}.sock"))
    }

    fn record_path(run_dir: &Path, pid: u32) -> PathBuf {
        run_dir.join(format!("{pid}.json"))
    }

    /// Writes the record atomically (so `list` never reads half of one),
    /// durably, and readable by its owner alone: it names key and token
    /// files and stores (never a token or key itself).
    pub fn publish(&self, run_dir: &Path) -> std::io::Result<()> {
        let path = Self::record_path(run_dir, self.pid);
        crate::durable::write_with_mode(
            &path,
            &serde_json::to_vec_pretty(self)?,
            crate::private::FILE_MODE,
        )
    }

    /// Removes the record and socket of device `pid`.
    pub fn remove(run_dir: &Path, pid: u32) {
        let _ = std::fs::remove_file(Self::record_path(run_dir, pid));
        let _ = std::fs::remove_file(Self::socket_path(run_dir, pid));
    }
}

/// Every device whose control socket answers, with its counters, and every
/// orphaned ublk device for which `still_exists(id)`. Records of devices
/// that are gone are removed on the way.
pub async fn list_devices(
    run_dir: &Path,
    still_exists: impl Fn(u32) -> bool,
) -> std::io::Result<Vec<DeviceStatus>> {
    let mut devices = Vec::new();
    let entries = match std::fs::read_dir(run_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(devices),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        let Ok(record) = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<DeviceRecord>(&bytes).map_err(|e| e.to_string())
            })
        else {
            continue;
        };
        match request(
            &DeviceRecord::socket_path(run_dir, record.pid),
            &ControlRequest::Stats,
        )
        .await
        {
            Ok(ControlResponse::Stats(stats)) => devices.push(DeviceStatus {
                record,
                state: DeviceState::Live,
                stats: Some(*stats),
            }),
            Ok(_) => {}
            Err(ControlError::Connect { .. }) => match &record.ublk {
                Some(ublk) if still_exists(ublk.id) => devices.push(DeviceStatus {
                    record,
                    state: DeviceState::Orphaned,
                    stats: None,
                }),
                _ => DeviceRecord::remove(run_dir, record.pid),
            },
            Err(e) => tracing::warn!("device {}: {e}", record.pid),
        }
    }
    // A dead process's record for a number the driver has since given to
    // a live device is stale.
    let live: Vec<u32> = devices
        .iter()
        .filter(|d| d.state == DeviceState::Live)
        .filter_map(|d| d.record.ublk.as_ref().map(|u| u.id))
        .collect();
    devices.retain(|d| match (&d.record.ublk, d.state) {
        (Some(ublk), DeviceState::Orphaned) if live.contains(&ublk.id) => {
            DeviceRecord::remove(run_dir, d.record.pid);
            false
        }
        _ => true,
    });
    devices.sort_by_key(|d| d.record.pid);
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_republished_record_replaces_the_old_one_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = DeviceRecord {
            pid: 42,
            frontend: FrontendKind::Fuse,
            target: "/mnt/app".into(),
            name: "app".into(),
            store: "/srv/store".into(),
            cache_dir: "/var/cache/app".into(),
            read_only: true,
            metrics: None,
            ublk: None,
        };
        record.publish(dir.path()).unwrap();
        record.read_only = false;
        record.publish(dir.path()).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["42.json"]);
        let read: DeviceRecord =
            serde_json::from_slice(&std::fs::read(dir.path().join("42.json")).unwrap()).unwrap();
        assert!(!read.read_only);
    }

    fn record_json(frontend: &str) -> String {
        format!(
            r#"{{"pid": 42, "frontend": "{frontend}", "target": "/dev/ublkb3",
                "name": "app", "store": "dir:/s", "cache_dir": "/c", "read_only": true,
                "ublk": {{"id": 3, "queues": 2, "depth": 128, "recoverable": false,
                          "store_spec": "/s", "key": "/k", "readahead_chunks": 8}}}}"#
        )
    }

    #[test]
    fn records_written_with_frontend_strings_still_read() {
        for (name, kind) in [
            ("ublk", FrontendKind::Ublk),
            ("fuse", FrontendKind::Fuse),
            ("vhost-user-blk", FrontendKind::VhostUserBlk),
        ] {
            let record: DeviceRecord = serde_json::from_str(&record_json(name)).unwrap();
            assert_eq!(record.frontend, kind);
            assert_eq!(kind.to_string(), name);
            let written = serde_json::to_value(&record).unwrap();
            assert_eq!(written["frontend"], name, "{written}");
            // A record without the flags it gained later reads as no flags.
            assert_eq!(record.ublk.map(|u| u.flags), Some(0));
        }
    }

    #[test]
    fn a_cache_fleet_round_trips_through_the_record() {
        let mut record: DeviceRecord = serde_json::from_str(&record_json("ublk")).unwrap();
        let ublk = record.ublk.as_mut().unwrap();
        assert_eq!((ublk.ec_cache.as_ref(), ublk.ec_shards), (None, None));
        ublk.ec_cache = Some("http://a:1,http://b:2".into());
        ublk.ec_shards = Some("4+2".parse().unwrap());
        let written = serde_json::to_value(&record).unwrap();
        assert_eq!(written["ublk"]["ec_shards"], "4+2", "{written}");
        let read: DeviceRecord = serde_json::from_value(written).unwrap();
        assert_eq!(read.ublk.unwrap().ec_shards, Some("4+2".parse().unwrap()));
        let bad = record_json("ublk").replace(
            r#""readahead_chunks""#,
            r#""ec_shards": "4+0", "readahead_chunks""#,
        );
        let err = serde_json::from_str::<DeviceRecord>(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid erasure-coding scheme"), "{err}");
    }

    #[test]
    fn an_unknown_frontend_is_refused_not_guessed() {
        let error = serde_json::from_str::<DeviceRecord>(&record_json("iscsi")).unwrap_err();
        assert!(error.to_string().contains("iscsi"), "{error}");
    }
}
