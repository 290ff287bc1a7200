//! Where training writes: caches, checkpoints, validation images, exports
//! and metrics. Natively a folder tree; in the browser the Origin Private
//! File System. Paths use `/` and are given as the configs name them.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[cfg(not(target_arch = "wasm32"))]
use crate::error::Error;
use crate::error::Result;

pub trait Storage {
    fn describe(&self) -> String;
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>>;
    /// Writes a whole file atomically: a reader sees the old content or the
    /// new, never a partial file. Parent folders are created.
    fn write(&self, path: &str, bytes: &[u8]) -> Result<()>;
    fn append(&self, path: &str, bytes: &[u8]) -> Result<()>;
    /// Names of the entries (files and folders) directly inside `dir`;
    /// empty when it does not exist.
    fn list(&self, dir: &str) -> Result<Vec<String>>;
    /// Renames a file or a whole folder (atomically where the platform can).
    fn rename(&self, from: &str, to: &str) -> Result<()>;
    /// Removes a file or a folder with everything in it; no error when absent.
    fn remove_all(&self, path: &str) -> Result<()>;
    fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.read(path)?.is_some())
    }
}

pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", dir.trim_end_matches('/'))
    }
}

/// A change to a [`MemoryStorage`], for mirroring it somewhere slower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The file now has new content (read it from the storage).
    Written(String),
    /// The file or folder is gone.
    Removed(String),
}

/// Files in memory (tests, and the browser, which mirrors it to OPFS).
#[derive(Default)]
pub struct MemoryStorage {
    files: Mutex<BTreeMap<String, Vec<u8>>>,
    changes: Mutex<Vec<Change>>,
}

impl MemoryStorage {
    pub fn paths(&self) -> Vec<String> {
        self.files.lock().expect("storage lock").keys().cloned().collect()
    }

    /// Adds a file without recording a change (loading from a mirror).
    pub fn preload(&self, path: &str, bytes: Vec<u8>) {
        self.files.lock().expect("storage lock").insert(path.to_string(), bytes);
    }

    /// The changes since the last call, oldest first.
    pub fn take_changes(&self) -> Vec<Change> {
        std::mem::take(&mut *self.changes.lock().expect("storage lock"))
    }

    /// Puts changes that could not be mirrored back in front of the newer
    /// ones, so the next `take_changes` returns them again (in order).
    pub fn requeue(&self, mut unsynced: Vec<Change>) {
        let mut changes = self.changes.lock().expect("storage lock");
        unsynced.append(&mut changes);
        *changes = unsynced;
    }

    fn record(&self, change: Change) {
        self.changes.lock().expect("storage lock").push(change);
    }
}

impl Storage for MemoryStorage {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.files.lock().expect("storage lock").get(path).cloned())
    }

    // The default reads (copies) the whole file; caches and checkpoint lists ask often.
    fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.files.lock().expect("storage lock").contains_key(path))
    }

    fn write(&self, path: &str, bytes: &[u8]) -> Result<()> {
        self.files.lock().expect("storage lock").insert(path.to_string(), bytes.to_vec());
        self.record(Change::Written(path.to_string()));
        Ok(())
    }

    fn append(&self, path: &str, bytes: &[u8]) -> Result<()> {
        self.files.lock().expect("storage lock").entry(path.to_string()).or_default().extend_from_slice(bytes);
        self.record(Change::Written(path.to_string()));
        Ok(())
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let mut names: Vec<String> = self
            .files
            .lock()
            .expect("storage lock")
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(|rest| rest.split('/').next().unwrap_or(rest).to_string()))
            .collect();
        names.dedup();
        Ok(names)
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let mut files = self.files.lock().expect("storage lock");
        let prefix = format!("{from}/");
        let moved: Vec<String> = files.keys().filter(|k| *k == from || k.starts_with(&prefix)).cloned().collect();
        let mut written = Vec::new();
        for key in moved {
            let value = files.remove(&key).expect("listed");
            let new_key = format!("{to}{}", &key[from.len()..]);
            files.insert(new_key.clone(), value);
            written.push(Change::Written(new_key));
        }
        drop(files);
        self.record(Change::Removed(from.to_string()));
        for change in written {
            self.record(change);
        }
        Ok(())
    }

    fn remove_all(&self, path: &str) -> Result<()> {
        let prefix = format!("{path}/");
        self.files.lock().expect("storage lock").retain(|k, _| k != path && !k.starts_with(&prefix));
        self.record(Change::Removed(path.to_string()));
        Ok(())
    }
}

/// The local filesystem.
#[cfg(not(target_arch = "wasm32"))]
pub struct DiskStorage;

#[cfg(not(target_arch = "wasm32"))]
fn io_error(path: &str, error: std::io::Error) -> Error {
    Error::Io { path: path.to_string(), message: error.to_string() }
}

#[cfg(not(target_arch = "wasm32"))]
impl Storage for DiskStorage {
    fn describe(&self) -> String {
        "disk".into()
    }

    fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(path, e)),
        }
    }

    fn write(&self, path: &str, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let target = std::path::Path::new(path);
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| io_error(&parent.display().to_string(), e))?;
        }
        let temporary = format!("{path}.partial-{}", std::process::id());
        let mut file = std::fs::File::create(&temporary).map_err(|e| io_error(&temporary, e))?;
        file.write_all(bytes).map_err(|e| io_error(&temporary, e))?;
        file.sync_all().map_err(|e| io_error(&temporary, e))?;
        std::fs::rename(&temporary, path).map_err(|e| io_error(path, e))
    }

    fn append(&self, path: &str, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        if let Some(parent) = std::path::Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| io_error(&parent.display().to_string(), e))?;
        }
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| io_error(path, e))?;
        file.write_all(bytes).map_err(|e| io_error(path, e))
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(dir, e)),
        };
        let mut names: Vec<String> = entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        Ok(names)
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        if let Some(parent) = std::path::Path::new(to).parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_error(to, e))?;
        }
        std::fs::rename(from, to).map_err(|e| io_error(to, e))
    }

    fn remove_all(&self, path: &str) -> Result<()> {
        let target = std::path::Path::new(path);
        let result = if target.is_dir() { std::fs::remove_dir_all(target) } else { std::fs::remove_file(target) };
        match result {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(path, e)),
            _ => Ok(()),
        }
    }

    fn exists(&self, path: &str) -> Result<bool> {
        Ok(std::path::Path::new(path).exists())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeued_changes_come_back_before_newer_ones() {
        let storage = MemoryStorage::default();
        storage.write("a", b"1").unwrap();
        storage.write("b", b"2").unwrap();
        let taken = storage.take_changes();
        assert_eq!(taken, [Change::Written("a".into()), Change::Written("b".into())]);
        // "a" was mirrored, "b" failed; meanwhile "c" was written and "a" removed.
        storage.write("c", b"3").unwrap();
        storage.remove_all("a").unwrap();
        storage.requeue(taken[1..].to_vec());
        assert_eq!(storage.take_changes(), [Change::Written("b".into()), Change::Written("c".into()), Change::Removed("a".into())]);
        assert!(storage.take_changes().is_empty());
    }
}
