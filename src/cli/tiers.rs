//! Opening the stores a command names: one store, or tiers (the host cache
//! first, then the cache fleet, then every `--store` in the order given).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::{parse_size, StoreArgs};
use crate::store::ec::open_fleet;
use crate::store::{open_store, ChunkStore, HostCache, TieredStore};

/// The default of `--host-cache-size`.
pub const DEFAULT_HOST_CACHE_SIZE: u64 = 10 << 30;

/// The host cache a command that reads images may use.
#[derive(Debug, Clone, Default, Args)]
pub struct HostCacheArgs {
    /// A chunk cache shared by every device and export on this host (a
    /// directory, created 0700): chunks another image already fetched are
    /// read from it instead of the store.
    #[arg(long, value_name = "DIR")]
    pub host_cache: Option<PathBuf>,
    /// Most bytes of chunks the host cache keeps (suffixes K, M, G); give
    /// every process that shares the cache the same size.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_HOST_CACHE_SIZE, value_parser = parse_size, requires = "host_cache")]
    pub host_cache_size: u64,
}

/// The opened store, and its tiers when there are several.
pub struct Tiers {
    pub store: Arc<dyn ChunkStore>,
    pub tiered: Option<Arc<TieredStore>>,
}

impl Tiers {
    /// Waits for the background fills of upper tiers, so a command that is
    /// about to exit leaves them filled.
    pub async fn settle(&self) {
        if let Some(tiered) = &self.tiered {
            tiered.settle().await;
        }
    }
}

/// One store when one is named and no host cache is set (reads then skip
/// the tier's id check, which the engine repeats anyway); tiers otherwise.
pub fn open(store: &StoreArgs, host_cache: &HostCacheArgs) -> anyhow::Result<Tiers> {
    if store.specs.is_empty() {
        anyhow::bail!("name the chunk store with --store STORE");
    }
    let options = store.options()?;
    let mut stores: Vec<Arc<dyn ChunkStore>> = Vec::new();
    if let Some(dir) = &host_cache.host_cache {
        stores.push(Arc::new(HostCache::open(dir, host_cache.host_cache_size)?));
    }
    if let Some(urls) = &store.ec_cache {
        stores.push(Arc::new(open_fleet(urls, store.ec_shards, &options)?));
    }
    for spec in &store.specs {
        stores.push(open_store(spec, &options)?);
    }
    if stores.len() == 1 {
        let store = stores.pop().expect("one store");
        return Ok(Tiers {
            store,
            tiered: None,
        });
    }
    let tiered = Arc::new(TieredStore::new(stores)?);
    Ok(Tiers {
        store: tiered.clone(),
        tiered: Some(tiered),
    })
}
