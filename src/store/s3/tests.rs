//! The S3 store against a SeaweedFS cluster on loopback: the promises every
//! engine keeps (tests/s3_store.rs covers the commands and failures).

use std::time::Duration;

use super::{S3Options, S3Store};
use crate::store::contract::check_gc_contract;

// The cluster guard the integration tests use, compiled here too so the
// crate-private contract checks can run against the real server.
#[path = "../../../tests/common/seaweedfs.rs"]
#[allow(dead_code)]
mod seaweedfs;

#[tokio::test(flavor = "multi_thread")]
async fn keeps_the_garbage_collection_contract_on_seaweedfs() {
    let cluster = tokio::task::spawn_blocking(seaweedfs::Cluster::start)
        .await
        .unwrap();
    let env = cluster.env();
    let store = S3Store::with_env(&cluster.store("contract"), &S3Options::default(), |name| {
        env.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
    })
    .unwrap();
    // Last-Modified has a resolution of one second.
    check_gc_contract(&store, Duration::from_secs(1)).await;
}
