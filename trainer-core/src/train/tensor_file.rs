//! Small safetensors files of f32 tensors: caches, checkpoints, exports.

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Error, Result};
use crate::models::safetensors_file::SafetensorsFile;

/// A named f32 tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl HostTensor {
    /// Reads a tensor back from its device. Asynchronous because the
    /// browser cannot wait for the GPU synchronously; natively, drive it
    /// with [`crate::block_on`].
    pub async fn from_tensor<const D: usize>(tensor: Tensor<D>) -> Result<Self> {
        let shape = tensor.dims().to_vec();
        let values = tensor
            .into_data_async()
            .await
            .map_err(|e| Error::Io { path: "tensor".into(), message: crate::error::device_failure("a tensor", e) })?
            .try_into_vec_as::<f32>()
            .map_err(|e| Error::Io { path: "tensor".into(), message: format!("{e:?}") })?;
        Ok(Self { shape, values })
    }

    /// A flattened tensor read back and given its `shape` again (module
    /// visitors flatten parameters of any rank into one list).
    pub async fn from_flat(flat: Tensor<1>, shape: Vec<usize>) -> Result<Self> {
        Ok(Self { shape, values: Self::from_tensor(flat).await?.values })
    }

    /// A `[1, ...]` tensor's single item, without the batch dimension.
    pub async fn from_batch_item<const D: usize>(tensor: Tensor<D>) -> Result<Self> {
        let mut host = Self::from_tensor(tensor).await?;
        if host.shape.first() != Some(&1) {
            return Err(Error::Io { path: "tensor".into(), message: format!("expected a batch of one, found shape {:?}", host.shape) });
        }
        host.shape.remove(0);
        Ok(host)
    }

    pub fn to_tensor<const D: usize>(&self, device: &burn::tensor::Device) -> Result<Tensor<D>> {
        let shape: [usize; D] = self
            .shape
            .clone()
            .try_into()
            .map_err(|_| Error::Io { path: "tensor".into(), message: format!("expected a {D}-dimensional tensor, found shape {:?}", self.shape) })?;
        Ok(Tensor::from_data(TensorData::new(self.values.clone(), shape), device))
    }
}

/// Serialises tensors (f32) with string metadata.
pub fn write(tensors: &BTreeMap<String, HostTensor>, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> =
        tensors.iter().map(|(name, t)| (name.clone(), t.values.iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape.clone())).collect();
    let views = bytes
        .iter()
        .map(|(name, data, shape)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::Io { path: name.clone(), message: e.to_string() })
        })
        .collect::<Result<Vec<_>>>()?;
    let info: HashMap<String, String> = metadata.clone().into_iter().collect();
    let bytes = safetensors::serialize(views, Some(info)).map_err(|e| Error::Io { path: "safetensors".into(), message: e.to_string() })?;
    Ok(with_sorted_header(bytes))
}

/// The safetensors crate writes its header from a `HashMap`, so the order
/// of the metadata (and so the file's bytes) changed from run to run. This
/// writes the same header with its keys sorted, in the same length (the
/// content is unchanged; the writer pads with spaces): one training gives
/// one file, byte for byte.
fn with_sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let length = u64::from_le_bytes(bytes[..8].try_into().expect("an 8-byte length")) as usize;
    let Ok(header) = serde_json::from_slice::<serde_json::Value>(&bytes[8..8 + length]) else { return bytes };
    let mut sorted = serde_json::to_vec(&header).expect("JSON serialises");
    if sorted.len() > length {
        return bytes;
    }
    sorted.resize(length, b' ');
    bytes[8..8 + length].copy_from_slice(&sorted);
    bytes
}

/// Reads every tensor of a safetensors file as f32.
pub fn read(path: &str, bytes: Vec<u8>) -> Result<BTreeMap<String, HostTensor>> {
    let file = SafetensorsFile::from_bytes(path, bytes)?;
    let mut tensors = BTreeMap::new();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    for name in names {
        let shape = file.info(&name).expect("listed").shape.clone();
        let values = file.to_f32(&name)?;
        tensors.insert(name, HostTensor { shape, values });
    }
    Ok(tensors)
}

/// The metadata of a safetensors file's header.
pub fn read_metadata(path: &str, bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Io { path: path.into(), message: e.to_string() })?;
    Ok(metadata.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_tensors_and_metadata_give_the_same_bytes() {
        let tensors = BTreeMap::from([
            ("b.weight".to_string(), HostTensor { shape: vec![2], values: vec![1.0, 2.0] }),
            ("a.weight".to_string(), HostTensor { shape: vec![1, 3], values: vec![3.0, 4.0, 5.0] }),
        ]);
        // Many keys: a HashMap's order would differ between two writes.
        let metadata: BTreeMap<String, String> = (0..24).map(|i| (format!("key_{i:02}"), format!("value {i}"))).collect();
        let first = write(&tensors, &metadata).unwrap();
        assert_eq!(first, write(&tensors, &metadata).unwrap());
        let header = String::from_utf8_lossy(&first[8..]);
        assert!(header.find("key_00").unwrap() < header.find("key_23").unwrap(), "metadata keys in order");
        let back = read("t.safetensors", first.clone()).unwrap();
        assert_eq!(back["a.weight"].values, [3.0, 4.0, 5.0]);
        assert_eq!(read_metadata("t.safetensors", &first).unwrap(), metadata);
    }
}
