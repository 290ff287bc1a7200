//! Where dataset files come from. The native runner walks a folder; the
//! browser hands over the `File`s a user picked. Both implement
//! [`ImageSource`], and everything after discovery is shared.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Extensions treated as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// Folders that hold tool or OS bookkeeping, never training images.
const SYSTEM_FOLDERS: [&str; 7] = ["__MACOSX", "$RECYCLE.BIN", "System Volume Information", ".Trashes", ".Spotlight-V100", ".fseventsd", ".ipynb_checkpoints"];
/// Files that OSes drop into folders.
const SYSTEM_FILES: [&str; 3] = [".DS_Store", "Thumbs.db", "desktop.ini"];

/// Random access to one file's bytes.
pub trait RandomAccess {
    fn len(&self) -> u64;
    /// Reads up to `length` bytes from `offset` (fewer at the end of the file).
    fn read_at(&mut self, offset: u64, length: usize) -> Result<Vec<u8>>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A dataset's files. Paths are relative to the dataset root, with `/`
/// separators, so plans and caches look the same on every platform.
pub trait ImageSource {
    /// A name for messages (the folder path, or "picked files").
    fn describe(&self) -> String;
    /// Every file under the root, recursively. Implementations skip hidden
    /// and system folders; [`discover`] filters the rest.
    fn list(&self) -> Result<Vec<String>>;
    fn open(&self, path: &str) -> Result<Box<dyn RandomAccess + '_>>;
    /// The whole file.
    fn read(&self, path: &str) -> Result<Vec<u8>> {
        let mut file = self.open(path)?;
        let length = file.len() as usize;
        file.read_at(0, length)
    }
    fn exists(&self, path: &str) -> bool;
}

/// Lowercased extension of a path, if any.
pub fn extension(path: &str) -> Option<String> {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.rsplit_once('.').filter(|(stem, _)| !stem.is_empty()).map(|(_, ext)| ext.to_ascii_lowercase())
}

/// Whether a path is inside a hidden or system folder, or is a system file.
pub fn is_hidden_or_system(path: &str) -> bool {
    let mut parts = path.split('/').peekable();
    while let Some(part) = parts.next() {
        let is_last = parts.peek().is_none();
        if is_last {
            return SYSTEM_FILES.contains(&part) || part.starts_with("._");
        }
        if part.starts_with('.') || SYSTEM_FOLDERS.contains(&part) {
            return true;
        }
    }
    false
}

/// Files found in a dataset, split into image candidates and other files.
#[derive(Debug, Default, Clone)]
pub struct Discovery {
    /// Files with an image extension, sorted.
    pub images: Vec<String>,
    /// Files that are neither images nor captions (reported, not used), sorted.
    pub other_files: Vec<String>,
}

/// Sorts a source's files into images and others. Caption `.txt` files and
/// OS bookkeeping files are not reported.
pub fn discover(source: &dyn ImageSource) -> Result<Discovery> {
    let mut discovery = Discovery::default();
    for path in source.list()? {
        if is_hidden_or_system(&path) {
            continue;
        }
        match extension(&path) {
            Some(ext) if IMAGE_EXTENSIONS.contains(&ext.as_str()) => discovery.images.push(path),
            Some(ext) if ext == "txt" => {}
            _ => discovery.other_files.push(path),
        }
    }
    discovery.images.sort();
    discovery.other_files.sort();
    Ok(discovery)
}

/// Files held in memory: what the browser builds from picked `File`s, and
/// what tests use.
#[derive(Debug, Default, Clone)]
pub struct MemorySource {
    pub name: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl MemorySource {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), files: BTreeMap::new() }
    }

    pub fn insert(&mut self, path: impl Into<String>, bytes: Vec<u8>) {
        self.files.insert(path.into(), bytes);
    }
}

/// Random access over bytes in memory.
pub struct SliceAccess<'a>(pub &'a [u8]);

impl RandomAccess for SliceAccess<'_> {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&mut self, offset: u64, length: usize) -> Result<Vec<u8>> {
        let start = (offset as usize).min(self.0.len());
        let end = start.saturating_add(length).min(self.0.len());
        Ok(self.0[start..end].to_vec())
    }
}

impl ImageSource for MemorySource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn list(&self) -> Result<Vec<String>> {
        Ok(self.files.keys().cloned().collect())
    }

    fn open(&self, path: &str) -> Result<Box<dyn RandomAccess + '_>> {
        let bytes = self.files.get(path).ok_or_else(|| Error::Io { path: path.to_string(), message: "no such file".into() })?;
        Ok(Box::new(SliceAccess(bytes)))
    }

    fn exists(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_filters_by_extension_case_insensitively_and_skips_hidden() {
        let mut source = MemorySource::new("mem");
        for path in ["a.JPG", "b.jpeg", "sub/c.Png", "d.webp", "e.bmp", "a.txt", "notes.md", ".hidden/x.png", "__MACOSX/y.png", ".DS_Store", "sub/._z.png"] {
            source.insert(path, vec![1]);
        }
        let found = discover(&source).unwrap();
        assert_eq!(found.images, ["a.JPG", "b.jpeg", "d.webp", "e.bmp", "sub/c.Png"]);
        assert_eq!(found.other_files, ["notes.md"]);
    }
}
