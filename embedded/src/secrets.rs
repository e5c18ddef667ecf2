//! Keys the embedded process creates on its first start and keeps in its
//! data directory (mode 0600), so a new user needs no setup and restarts
//! keep working sessions: the bootstrap admin key, the ingest key and the
//! session-signing secret. Flags or environment variables override them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Reads `dir/name`, or writes `prefix` + 32 random bytes in hex there
/// first. Creation is atomic (`create_new`), so two racing starts agree.
pub fn load_or_create(dir: &Path, name: &str, prefix: &str) -> anyhow::Result<String> {
    let path = dir.join(name);
    if let Ok(s) = std::fs::read_to_string(&path) {
        return Ok(s.trim().to_owned());
    }
    let value = format!("{prefix}{}", hex::encode(rand::random::<[u8; 32]>()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            f.write_all(value.as_bytes())?;
            f.sync_all()?;
            Ok(value)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(&path)?.trim().to_owned())
        }
        Err(e) => Err(anyhow::anyhow!("creating {}: {e}", path.display())),
    }
}

/// Creates `dir` owner-only (0700), or makes an existing one so: the data
/// directory holds the keys and every customer's usage and invoices. An
/// existing directory with looser permissions is tightened, with a warning.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "data directory was readable by others; now 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Creates `path` empty and owner-only (0600) if it does not exist, or
/// makes an existing one owner-only (with a warning when it was not).
pub fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(file = %path.display(), mode = format!("{mode:o}"), "file was readable by others; now 0600");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_read_back() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create(d.path(), "k", "tally_").unwrap();
        assert!(a.starts_with("tally_") && a.len() == 6 + 64, "{a}");
        assert_eq!(load_or_create(d.path(), "k", "tally_").unwrap(), a);
        let mode = std::fs::metadata(d.path().join("k")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }
}
