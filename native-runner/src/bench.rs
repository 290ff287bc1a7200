//! Shared by the benchmark binaries (`src/bin/bench_*.rs`): the reference
//! configs of docs/reference.md §5 and small helpers. Benchmarks, not tests.

use burn::tensor::Device;

use crate::device::pick;

/// The "mid-size UNet" of docs/reference.md §5: SD1-style, blocks 64/128/256/256, 2
/// layers per block, 8 heads, context 256 (35.1 M parameters).
pub const MID_SIZE_UNET: &str = r#"{"block_out_channels":[64,128,256,256],"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],"layers_per_block":2,"attention_head_dim":8,"cross_attention_dim":256,"norm_num_groups":32}"#;

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The devices of a `--device cpu,cpu-gpu,gpu` list with their labels;
/// unknown names are reported and skipped.
pub fn devices(list: &str) -> Vec<(&'static str, Device)> {
    let mut found = Vec::new();
    for name in list.split(',') {
        let label = match name {
            "cpu" => "burn flex",
            "cpu-gpu" => "wgpu (cpu adapter)",
            _ => "wgpu (gpu)",
        };
        match pick(name) {
            Ok(picked) => found.push((label, picked.device)),
            Err(error) => eprintln!("{error}"),
        }
    }
    found
}

/// ", N MiB reserved in the device's memory pools" where the device has
/// pools (wgpu): they keep the pages they grew to, so this is what the
/// device had to hold. Empty elsewhere.
pub fn pool_memory(device: &Device) -> String {
    device.memory_pool_usage().map(|u| format!(", {:.0} MiB reserved in the device's memory pools", u.bytes_reserved as f64 / 1048576.0)).unwrap_or_default()
}
