//! A dataset folder on disk as an [`ImageSource`]: a recursive walk that
//! follows symlinks once (no loops), skipping hidden and system folders.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use trainer_core::data::source::{is_hidden_or_system, ImageSource, RandomAccess};
use trainer_core::{Error, Result};

pub struct FolderSource {
    root: PathBuf,
}

impl FolderSource {
    /// Opens a dataset folder; `dataset` names the dataset in errors.
    pub fn open(dataset: &str, root: &str) -> Result<Self> {
        let path = PathBuf::from(root);
        if !path.exists() {
            return Err(Error::Dataset { dataset: dataset.to_string(), message: format!("instance_data_dir '{root}' does not exist") });
        }
        if !path.is_dir() {
            return Err(Error::Dataset { dataset: dataset.to_string(), message: format!("instance_data_dir '{root}' is not a folder") });
        }
        Ok(Self { root: path })
    }

    fn walk(&self, dir: &Path, relative: &str, visited: &mut HashSet<PathBuf>, out: &mut Vec<String>) -> Result<()> {
        let canonical = dir.canonicalize().map_err(|e| io_error(dir, e))?;
        if !visited.insert(canonical) {
            return Ok(()); // already walked through another link
        }
        let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let child_relative = if relative.is_empty() { name.clone() } else { format!("{relative}/{name}") };
            if is_hidden_or_system(&child_relative) {
                continue;
            }
            let path = entry.path();
            // metadata() follows symlinks; a dangling link is skipped.
            let Ok(metadata) = std::fs::metadata(&path) else { continue };
            if metadata.is_dir() {
                self.walk(&path, &child_relative, visited, out)?;
            } else if metadata.is_file() {
                out.push(child_relative);
            }
        }
        Ok(())
    }
}

fn io_error(path: &Path, error: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), message: error.to_string() }
}

struct FileAccess {
    file: File,
    length: u64,
    path: PathBuf,
}

impl RandomAccess for FileAccess {
    fn len(&self) -> u64 {
        self.length
    }

    fn read_at(&mut self, offset: u64, length: usize) -> Result<Vec<u8>> {
        let available = self.length.saturating_sub(offset).min(length as u64) as usize;
        let mut buffer = vec![0; available];
        self.file.seek(SeekFrom::Start(offset)).map_err(|e| io_error(&self.path, e))?;
        self.file.read_exact(&mut buffer).map_err(|e| io_error(&self.path, e))?;
        Ok(buffer)
    }
}

impl ImageSource for FolderSource {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn list(&self) -> Result<Vec<String>> {
        let mut files = Vec::new();
        self.walk(&self.root, "", &mut HashSet::new(), &mut files)?;
        Ok(files)
    }

    fn open(&self, path: &str) -> Result<Box<dyn RandomAccess + '_>> {
        let full = self.root.join(path);
        let file = File::open(&full).map_err(|e| io_error(&full, e))?;
        let length = file.metadata().map_err(|e| io_error(&full, e))?.len();
        Ok(Box::new(FileAccess { file, length, path: full }))
    }

    fn read(&self, path: &str) -> Result<Vec<u8>> {
        let full = self.root.join(path);
        std::fs::read(&full).map_err(|e| io_error(&full, e))
    }

    fn exists(&self, path: &str) -> bool {
        self.root.join(path).is_file()
    }
}
