//! Key files: written 0600, refused when others may read them.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::chunk::TenantKey;

pub fn keygen(out: &Path) -> anyhow::Result<()> {
    let mut key = TenantKey([0; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key.0);
    let mut file = crate::private::file_options()
        .write(true)
        .create_new(true)
        .open(out)
        .with_context(|| format!("create key file {}", out.display()))?;
    file.write_all(key.to_file_text().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write key file {}", out.display()))?;
    outln!("wrote a new tenant key to {}", out.display());
    Ok(())
}

/// Reads a key file, refusing one that group or others may read: a key that
/// leaked through a loose mode is as good as published.
pub fn load_key(path: &Path) -> anyhow::Result<TenantKey> {
    crate::private::check(path, crate::private::KEY_FILE)?;
    let text = zeroize::Zeroizing::new(
        std::fs::read(path).with_context(|| format!("read key file {}", path.display()))?,
    );
    TenantKey::parse(&text).with_context(|| format!("key file {}", path.display()))
}
