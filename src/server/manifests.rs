//! The manifest routes. Manifests are sealed, but unlike chunks they are
//! replaced under the same name, so caches must check before reuse.

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, StatusCode};

use super::auth::Access;
use super::reply::{
    check_length, json, read_body, refuse, reply, store_failure, Handled, RequestBody,
};
use super::State;
use crate::net::protocol::ManifestList;
use crate::store::{is_trace_name, validate_manifest_name, MAX_MANIFEST_SIZE};

pub(super) async fn get(state: &State, name: &str, parts: &Parts, head: bool) -> Handled {
    validate_manifest_name(name).map_err(store_failure)?;
    state.allow(&parts.headers, Access::Read)?;
    let manifest = state
        .store
        .get_manifest(name)
        .await
        .map_err(store_failure)?;
    let len = manifest.len();
    let mut reply = reply(StatusCode::OK, if head { Bytes::new() } else { manifest });
    let headers = reply.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(reply)
}

pub(super) async fn put(state: &State, name: &str, parts: &Parts, body: RequestBody) -> Handled {
    validate_manifest_name(name).map_err(store_failure)?;
    state.allow(&parts.headers, Access::Write)?;
    check_length(&parts.headers, MAX_MANIFEST_SIZE)?;
    let manifest = read_body(body, MAX_MANIFEST_SIZE, state.options.body_timeout).await?;
    state
        .store
        .put_manifest(name, manifest)
        .await
        .map_err(store_failure)?;
    Ok(reply(StatusCode::NO_CONTENT, Bytes::new()))
}

/// Removing an absent manifest succeeds, as in every store: a retried
/// delete whose first answer was lost must not fail. Only traces and trace
/// runs are removed (a merge folds runs away): an image's manifest is what
/// its devices and `gc` stand on, and no client removes one over HTTP.
pub(super) async fn delete(state: &State, name: &str, parts: &Parts) -> Handled {
    validate_manifest_name(name).map_err(store_failure)?;
    state.allow(&parts.headers, Access::Write)?;
    if !is_trace_name(name) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            format!("{name:?} is not a trace or trace run: only those are removed over HTTP"),
        ));
    }
    state
        .store
        .delete_manifest(name)
        .await
        .map_err(store_failure)?;
    Ok(reply(StatusCode::NO_CONTENT, Bytes::new()))
}

pub(super) async fn list(state: &State, parts: &Parts) -> Handled {
    state.allow(&parts.headers, Access::Read)?;
    let mut manifests = state.store.list_manifests().await.map_err(store_failure)?;
    manifests.sort_unstable();
    Ok(json(&ManifestList { manifests }))
}
