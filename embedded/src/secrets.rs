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
