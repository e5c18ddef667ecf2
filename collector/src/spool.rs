//! The local disk spool: where accepted events wait while Kafka is away.
//!
//! Each spooled write is one file, `NNNNNNNNNNNNNNNNNNNN.batch`, written to a
//! temporary name, fsynced, renamed into place and followed by an fsync of
//! the directory. Only after that does the collector answer 2xx, so a
//! collector killed with SIGKILL loses nothing it acknowledged: on restart
//! the files are still there and are replayed. A file is deleted only after
//! Kafka acknowledged every record in it; a crash between the acknowledgement
//! and the delete replays the file again, which the aggregator's
//! deduplication by (`source`, `id`) absorbs.
//!
//! File format: records of `u32 key_len, key, u32 value_len, value`
//! (little-endian), then a `u32` CRC-32 of everything before it. A file whose
//! CRC does not match is moved to `corrupt/` and logged, never deleted.

use crate::sink::Envelope;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    next_seq: AtomicU64,
}

/// One spooled file, read back.
#[derive(Debug)]
pub struct SpoolFile {
    pub path: PathBuf,
    pub records: Vec<Envelope>,
}

fn encode(records: &[Envelope]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(
        records
            .iter()
            .map(|r| r.key.len() + r.payload.len() + 8)
            .sum::<usize>()
            + 4,
    );
    for r in records {
        buf.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
        buf.extend_from_slice(r.key.as_bytes());
        buf.extend_from_slice(&(r.payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&r.payload);
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

fn decode(bytes: &[u8]) -> Option<Vec<Envelope>> {
    if bytes.len() < 4 {
        return None;
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = body.get(at..at + n)?;
        at += n;
        Some(s)
    };
    while let Some(klen) = take(4) {
        let klen = u32::from_le_bytes(klen.try_into().ok()?) as usize;
        let key = String::from_utf8(take(klen)?.to_vec()).ok()?;
        let vlen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let payload = take(vlen)?.to_vec();
        out.push(Envelope { key, payload });
    }
    Some(out)
}

impl Spool {
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        let mut max = 0;
        for e in fs::read_dir(&dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(".tmp") {
                // A write that never completed was never acknowledged.
                let _ = fs::remove_file(dir.join(name.as_ref()));
                let _ = n;
            } else if let Some(n) = name
                .strip_suffix(".batch")
                .and_then(|n| n.parse::<u64>().ok())
            {
                max = max.max(n);
            }
        }
        Ok(Self {
            dir,
            next_seq: AtomicU64::new(max + 1),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Durably writes the records; returns once they are on disk.
    pub fn append(&self, records: &[Envelope]) -> std::io::Result<()> {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let final_path = self.dir.join(format!("{seq:020}.batch"));
        let tmp = self.dir.join(format!("{seq:020}.tmp"));
        {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(&encode(records))?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &final_path)?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// Spooled files, oldest first. Corrupt files are moved aside.
    pub fn pending(&self) -> std::io::Result<Vec<SpoolFile>> {
        let mut names: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "batch"))
            .collect();
        names.sort();
        let mut out = Vec::new();
        for path in names {
            let mut bytes = Vec::new();
            File::open(&path)?.read_to_end(&mut bytes)?;
            match decode(&bytes) {
                Some(records) => out.push(SpoolFile { path, records }),
                None => {
                    let corrupt = self.dir.join("corrupt");
                    fs::create_dir_all(&corrupt)?;
                    let dest = corrupt.join(path.file_name().unwrap());
                    tracing::error!(path = %path.display(), dest = %dest.display(), "spool file fails its checksum; moved aside for inspection");
                    fs::rename(&path, dest)?;
                }
            }
        }
        Ok(out)
    }

    /// Number of events waiting in the spool.
    pub fn depth(&self) -> std::io::Result<usize> {
        Ok(self.pending()?.iter().map(|f| f.records.len()).sum())
    }

    /// Removes a file whose records Kafka has acknowledged.
    pub fn remove(&self, file: &SpoolFile) -> std::io::Result<()> {
        fs::remove_file(&file.path)?;
        File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str, v: &str) -> Envelope {
        Envelope {
            key: k.into(),
            payload: v.as_bytes().to_vec(),
        }
    }

    #[test]
    fn append_read_remove_roundtrip_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path()).unwrap();
        s.append(&[env("c1", "{}"), env("c2", "{\"a\":1}")])
            .unwrap();
        s.append(&[env("c3", "x")]).unwrap();
        drop(s);
        let s = Spool::open(dir.path()).unwrap();
        let files = s.pending().unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(
            files[0].records,
            vec![env("c1", "{}"), env("c2", "{\"a\":1}")]
        );
        assert_eq!(s.depth().unwrap(), 3);
        s.remove(&files[0]).unwrap();
        s.append(&[env("c4", "y")]).unwrap();
        let files = s.pending().unwrap();
        assert_eq!(
            files
                .iter()
                .map(|f| f.records[0].key.as_str())
                .collect::<Vec<_>>(),
            vec!["c3", "c4"]
        );
    }

    #[test]
    fn corrupt_file_is_moved_aside_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path()).unwrap();
        s.append(&[env("c1", "{}")]).unwrap();
        let path = s.pending().unwrap()[0].path.clone();
        let mut bytes = fs::read(&path).unwrap();
        bytes[5] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        assert!(s.pending().unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path().join("corrupt")).unwrap().count(), 1);
    }
}
