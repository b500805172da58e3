//! Flattening an OCI image source: each layer's tar, read once, straight
//! into the [`Flattener`].

use std::io::Read;

use super::{FlattenError, FlattenOptions, FlattenReport, Flattener, ImageSink};
use crate::error::ErrorKind;
use crate::oci::layer::{read_layer, LayerError, LayerLimits};
use crate::oci::pump::PumpedReader;
use crate::oci::source::{ImageSource, SourceError};

/// Why an image source could not be flattened.
#[derive(Debug, thiserror::Error)]
pub enum FlattenSourceError {
    #[error("open layer {number} ({digest}) of {source_name}")]
    OpenLayer {
        /// 1 for the base layer.
        number: usize,
        digest: String,
        source_name: String,
        #[source]
        source: Box<SourceError>,
    },
    #[error("start reading layer {number} of {source_name}")]
    StartPump {
        /// 1 for the base layer.
        number: usize,
        source_name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("read layer {number} of {source_name}")]
    ReadLayer {
        /// 1 for the base layer.
        number: usize,
        source_name: String,
        #[source]
        source: Box<LayerError>,
    },
    #[error("flatten {source_name}")]
    Flatten {
        source_name: String,
        #[source]
        source: Box<FlattenError>,
    },
}

impl FlattenSourceError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FlattenSourceError::OpenLayer { source, .. } => source.kind(),
            FlattenSourceError::ReadLayer { source, .. } => source.kind(),
            FlattenSourceError::StartPump { .. } => ErrorKind::Io,
            FlattenSourceError::Flatten { .. } => ErrorKind::Invalid,
        }
    }
}

/// Where a flatten is: `layer` of `layers` (1-based), and the file bytes
/// applied from it so far.
#[derive(Debug, Clone, Copy)]
pub struct FlattenProgress {
    pub layer: usize,
    pub layers: usize,
    pub layer_bytes: u64,
}

/// Applies every layer of `source`, base first, and writes the image to
/// `sink`. Any error leaves what the sink received unusable.
pub fn flatten_source<S: ImageSink>(
    source: &dyn ImageSource,
    sink: S,
    opts: FlattenOptions,
    limits: &mut LayerLimits,
    progress: &dyn Fn(FlattenProgress),
) -> Result<FlattenReport, FlattenSourceError> {
    let source_name = source.describe();
    let flatten_error = |source| FlattenSourceError::Flatten {
        source_name: source_name.clone(),
        source: Box::new(source),
    };
    let mut flattener = Flattener::with_sink(sink, opts);
    let layers = source.layers();
    for (index, layer) in layers.iter().enumerate() {
        let digest = layer.digest.to_string();
        let tar = source
            .open_layer(index)
            .map_err(|source| FlattenSourceError::OpenLayer {
                number: index + 1,
                digest: digest.clone(),
                source_name: source_name.clone(),
                source: Box::new(source),
            })?;
        // Decompression runs beside the flattener rather than before it.
        let tar = PumpedReader::new(tar).map_err(|source| FlattenSourceError::StartPump {
            number: index + 1,
            source_name: source_name.clone(),
            source,
        })?;
        flattener.begin_layer(&digest).map_err(flatten_error)?;
        let mut layer_bytes = 0u64;
        let mut apply = |entry: crate::oci::entry::LayerEntry, data: &mut dyn Read| {
            if let crate::oci::entry::EntryKind::Regular { size } = entry.kind {
                layer_bytes += size;
            }
            flattener.apply(entry, data)?;
            progress(FlattenProgress {
                layer: index + 1,
                layers: layers.len(),
                layer_bytes,
            });
            Ok(())
        };
        read_layer(tar, &digest, limits, &mut apply).map_err(|source| {
            FlattenSourceError::ReadLayer {
                number: index + 1,
                source_name: source_name.clone(),
                source: Box::new(source),
            }
        })?;
        flattener.end_layer().map_err(flatten_error)?;
    }
    flattener.finish().map_err(flatten_error)
}
