//! Reading `.safetensors` files: memory-mapped natively (the weights are
//! never read into a second buffer), from bytes in the browser. Tensors are
//! handed out as f32, converted from f16 or bf16 where stored so.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::{Error, Result};

enum Storage {
    Owned(Vec<u8>),
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(bytes) => bytes,
            #[cfg(not(target_arch = "wasm32"))]
            Storage::Mapped(map) => map,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

pub struct SafetensorsFile {
    pub path: String,
    storage: Storage,
    tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

/// Pickle-based formats are refused: loading them can run arbitrary code.
pub fn refuse_pickle(path: &str) -> Result<()> {
    let lower = path.to_ascii_lowercase();
    if [".ckpt", ".pt", ".pth", ".bin", ".pkl"].iter().any(|ext| lower.ends_with(ext)) {
        return Err(Error::Io {
            path: path.to_string(),
            message: "this is a pickle file, which Burnbooth never loads (unpickling can run arbitrary code). \
                      Convert it to .safetensors first, e.g. with diffusers or the `safetensors` Python package."
                .into(),
        });
    }
    Ok(())
}

impl SafetensorsFile {
    /// Memory-maps a file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &str) -> Result<Self> {
        refuse_pickle(path)?;
        let file = std::fs::File::open(path).map_err(|e| Error::Io { path: path.to_string(), message: e.to_string() })?;
        // Safety: the map is read-only; a file changed underneath us while
        // loading is the user's to avoid (as with any memory-mapped loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io { path: path.to_string(), message: e.to_string() })?;
        Self::from_storage(path, Storage::Mapped(map))
    }

    pub fn from_bytes(path: &str, bytes: Vec<u8>) -> Result<Self> {
        refuse_pickle(path)?;
        Self::from_storage(path, Storage::Owned(bytes))
    }

    fn from_storage(path: &str, storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        // A safetensors file is an 8-byte header length and then its JSON
        // header, so byte 8 is `{`; only without that do the pickle and zip
        // signatures count (a header length whose low byte is 0x80 is fine).
        let safetensors_like = bytes.get(8) == Some(&b'{');
        if !safetensors_like && (bytes.starts_with(b"PK\x03\x04") || bytes.first() == Some(&0x80)) {
            return Err(Error::Io {
                path: path.to_string(),
                message: "this is a PyTorch pickle/zip checkpoint, not safetensors; Burnbooth never unpickles. Convert it to .safetensors first.".into(),
            });
        }
        let (header_length, metadata) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::Io { path: path.to_string(), message: format!("not a valid .safetensors file (truncated or corrupt?): {e}") })?;
        let data_start = 8 + header_length;
        let mut tensors = BTreeMap::new();
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            // Offsets come from the file: checked, so a header claiming
            // offsets near usize::MAX is refused rather than wrapping.
            let Some(file_end) = data_start.checked_add(end).filter(|e| *e <= bytes.len() && start <= end) else {
                return Err(Error::Io {
                    path: path.to_string(),
                    message: format!("truncated: tensor '{name}' ends at byte {data_start}+{end} but the file has {}", bytes.len()),
                });
            };
            tensors.insert(name.clone(), TensorInfo { dtype: info.dtype, shape: info.shape.clone(), start: data_start + start, end: file_end });
        }
        let metadata = metadata.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(Self { path: path.to_string(), storage, tensors, metadata })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// A tensor's values as f32 (from f32, f16 or bf16 storage).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensors.get(name).ok_or_else(|| Error::Io { path: self.path.clone(), message: format!("no tensor '{name}'") })?;
        let raw = &self.storage.bytes()[info.start..info.end];
        let values = match info.dtype {
            Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F64 => raw.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            other => return Err(Error::Io { path: self.path.clone(), message: format!("tensor '{name}' has dtype {other:?}; expected a float type") }),
        };
        Ok(values)
    }

    /// Integer tensors (token ids in the fixtures) as i64.
    pub fn to_i64(&self, name: &str) -> Result<Vec<i64>> {
        let info = self.tensors.get(name).ok_or_else(|| Error::Io { path: self.path.clone(), message: format!("no tensor '{name}'") })?;
        let raw = &self.storage.bytes()[info.start..info.end];
        match info.dtype {
            Dtype::I64 => Ok(raw.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()),
            Dtype::I32 => Ok(raw.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64).collect()),
            other => Err(Error::Io { path: self.path.clone(), message: format!("tensor '{name}' has dtype {other:?}; expected an integer type") }),
        }
    }
}
