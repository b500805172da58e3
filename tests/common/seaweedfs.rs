//! A SeaweedFS cluster on loopback for one test: `scripts/seaweedfs-cluster.sh`
//! started in a process group of its own, killed whole when the guard drops.
//!
//! `weed` must be installed already (scripts/test.sh does it, into the tools
//! cache) or named by `LAZYBLK_WEED`; a missing binary fails the test.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long the cluster may take to accept writes, on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running cluster: a master, three volume servers (every object on two
/// of them), a filer and an S3 gateway, with one bucket.
pub struct Cluster {
    /// The script; its process group holds every server.
    launcher: Child,
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    pub volume_pids: Vec<u32>,
    /// Declared last: the data outlives the servers that write it.
    pub dir: TempDir,
}

/// The `weed` binary: `$LAZYBLK_WEED`, else the one scripts/test.sh installs.
pub fn weed_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LAZYBLK_WEED") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("LAZYBLK_TOOLS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| Path::new(&c).join("lazyblk/tools")))
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/lazyblk/tools")))
        .expect("HOME is set");
    cache.join("seaweedfs/bin/weed")
}

/// Launches tried before giving up: the free ports the script picks are
/// released before the servers bind them, so a parallel test can take one.
const ATTEMPTS: u32 = 3;

impl Cluster {
    pub fn start() -> Cluster {
        let weed = weed_bin();
        assert!(
            weed.is_file(),
            "SeaweedFS's `weed` is not at {}: run scripts/test.sh, which installs it, \
             or set LAZYBLK_WEED to a weed binary",
            weed.display()
        );
        let mut failures = String::new();
        for attempt in 1..=ATTEMPTS {
            match Cluster::launch(&weed) {
                Ok(cluster) => return cluster,
                Err(why) => failures.push_str(&format!("attempt {attempt}: {why}\n")),
            }
        }
        panic!("the SeaweedFS cluster did not start:\n{failures}");
    }

    /// One launch; on failure, why, with the launcher's output.
    fn launch(weed: &Path) -> Result<Cluster, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/seaweedfs-cluster.sh");
        let log = dir.path().join("launcher.log");
        let launcher = Command::new(&script)
            .arg(dir.path().join("cluster"))
            .env("LAZYBLK_WEED", weed)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.path().join("launcher.out")).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", script.display()));
        let mut cluster = Cluster {
            launcher,
            endpoint: String::new(),
            bucket: String::new(),
            access_key: String::new(),
            secret_key: String::new(),
            region: String::new(),
            volume_pids: Vec::new(),
            dir,
        };
        let env_file = cluster.dir.path().join("cluster/cluster.env");
        let started = Instant::now();
        while !env_file.exists() {
            let exited = cluster.launcher.try_wait().unwrap();
            if exited.is_some() || started.elapsed() > START_TIMEOUT {
                // Dropping the guard kills whatever did start.
                return Err(format!(
                    "{}\n{}",
                    exited.map_or("timed out".to_owned(), |s| s.to_string()),
                    fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for line in fs::read_to_string(&env_file).unwrap().lines() {
            let (name, value) = line.split_once('=').unwrap();
            let value = value.trim_matches('"').to_owned();
            match name {
                "S3_ENDPOINT" => cluster.endpoint = value,
                "S3_BUCKET" => cluster.bucket = value,
                "AWS_ACCESS_KEY_ID" => cluster.access_key = value,
                "AWS_SECRET_ACCESS_KEY" => cluster.secret_key = value,
                "AWS_REGION" => cluster.region = value,
                "VOLUME_PIDS" => {
                    cluster.volume_pids = value.split(' ').map(|p| p.parse().unwrap()).collect()
                }
                _ => {}
            }
        }
        assert_eq!(cluster.volume_pids.len(), 3, "{env_file:?}");
        Ok(cluster)
    }

    /// `s3://BUCKET/prefix`.
    pub fn store(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The environment a client of this cluster needs.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }

    /// Kills volume server `index` (0 to 2) at once, as a crash would.
    pub fn kill_volume_server(&self, index: usize) {
        let pid = self.volume_pids[index];
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill volume server {pid}");
        while Path::new(&format!("/proc/{pid}/status")).exists()
            && !fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .contains("State:\tZ")
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The servers' logs, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for entry in fs::read_dir(self.dir.path().join("cluster")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                let log = fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                text.push_str(&format!("---- {}\n", path.display()));
                for line in tail.iter().rev() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The whole group: the script and every server it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.launcher.id())])
            .status();
        let _ = self.launcher.wait();
    }
}
