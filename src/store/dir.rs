//! The directory store: the embedded default.
#![forbid(unsafe_code)]

use std::path::Path;

use super::StoreError;

/// Placeholder until the directory engine lands.
#[derive(Debug)]
pub struct DirStore;

impl DirStore {
    pub fn open(path: &Path) -> Result<std::sync::Arc<dyn super::ChunkStore>, StoreError> {
        Err(StoreError::InvalidSpec {
            spec: path.display().to_string(),
            reason: "not built yet".into(),
        })
    }
}
