//! AutoencoderKL: images to latent distributions and latents back to images.
//! Field names follow diffusers' keys (`encoder.down_blocks.N.resnets.M`, ...).

use super::activation::silu;
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::tensor::Tensor;

use super::blocks::{Attention, Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::config::VaeConfig;
use super::layers::Conv2d;
use super::loader::Loader;

/// The VAE's blocks use GroupNorm eps 1e-6 (the UNet's 1e-5).
const EPS: f64 = 1e-6;

#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// One attention over all positions, or none (`mid_block_add_attention` off).
    pub attentions: Vec<Attention>,
}

impl MidBlock {
    fn load(loader: &mut Loader<'_>, channels: usize, groups: usize, attention: bool) -> Self {
        let resnet = ResnetConfig { c_in: channels, c_out: channels, temb: None, groups, eps: EPS };
        let first = ResnetBlock2D::load(&mut loader.pp("resnets").pp(0), resnet);
        let attentions = if attention { vec![Attention::load_spatial(&mut loader.pp("attentions").pp(0), channels, groups, EPS)] } else { Vec::new() };
        let second = ResnetBlock2D::load(&mut loader.pp("resnets").pp(1), resnet);
        Self { resnets: vec![first, second], attentions }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        for attention in &self.attentions {
            x = attention.forward_image(x);
        }
        self.resnets[1].forward(x, None)
    }
}

#[derive(Module, Debug)]
pub struct EncoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// One, except in the last block.
    pub downsamplers: Vec<Downsample2D>,
}

#[derive(Module, Debug)]
pub struct DecoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// One, except in the last block.
    pub upsamplers: Vec<Upsample2D>,
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<EncoderBlock>,
    pub mid_block: MidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<DecoderBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Module, Debug)]
pub struct AutoencoderKl {
    pub encoder: Encoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    pub decoder: Decoder,
}

/// The encoder's output: a diagonal Gaussian over latents.
pub struct LatentDistribution {
    pub mean: Tensor<4>,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor<4>,
}

impl LatentDistribution {
    /// `mean + std * noise` (noise from N(0, 1), same shape as `mean`).
    pub fn sample_with(&self, noise: Tensor<4>) -> Tensor<4> {
        self.mean.clone() + (self.logvar.clone() * 0.5).exp() * noise
    }
}

impl AutoencoderKl {
    pub fn load(config: &VaeConfig, loader: &mut Loader<'_>) -> Self {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let levels = channels.len();
        let latent = config.latent_channels;
        let top = channels[levels - 1];

        let resnet = |c_in, c_out| ResnetConfig { c_in, c_out, temb: None, groups, eps: EPS };
        let encoder = {
            let mut loader = loader.pp("encoder");
            let mut down_blocks = Vec::new();
            let mut c_in = channels[0];
            for (i, &c_out) in channels.iter().enumerate() {
                let mut blocks = loader.pp("down_blocks");
                let mut block = blocks.pp(i);
                let resnets = (0..config.layers_per_block)
                    .map(|j| ResnetBlock2D::load(&mut block.pp("resnets").pp(j), resnet(if j == 0 { c_in } else { c_out }, c_out)))
                    .collect();
                let downsamplers = if i + 1 < levels { vec![Downsample2D::load(&mut block.pp("downsamplers").pp(0), c_out, true)] } else { Vec::new() };
                down_blocks.push(EncoderBlock { resnets, downsamplers });
                c_in = c_out;
            }
            let conv_in = loader.conv2d("conv_in", config.in_channels, channels[0], 3, 1, 1);
            let mid_block = MidBlock::load(&mut loader.pp("mid_block"), top, groups, config.mid_block_add_attention);
            let conv_norm_out = loader.group_norm("conv_norm_out", groups, top, EPS);
            Encoder { conv_in, down_blocks, mid_block, conv_norm_out, conv_out: loader.conv2d("conv_out", top, 2 * latent, 3, 1, 1) }
        };
        let quant_conv = config.use_quant_conv.then(|| loader.conv2d("quant_conv", 2 * latent, 2 * latent, 1, 1, 0));
        let post_quant_conv = config.use_post_quant_conv.then(|| loader.conv2d("post_quant_conv", latent, latent, 1, 1, 0));

        let decoder = {
            let mut loader = loader.pp("decoder");
            let conv_in = loader.conv2d("conv_in", latent, top, 3, 1, 1);
            let mid_block = MidBlock::load(&mut loader.pp("mid_block"), top, groups, config.mid_block_add_attention);
            let mut up_blocks = Vec::new();
            let mut c_in = top;
            for (i, &c_out) in channels.iter().rev().enumerate() {
                let mut blocks = loader.pp("up_blocks");
                let mut block = blocks.pp(i);
                let resnets = (0..config.layers_per_block + 1)
                    .map(|j| ResnetBlock2D::load(&mut block.pp("resnets").pp(j), resnet(if j == 0 { c_in } else { c_out }, c_out)))
                    .collect();
                let upsamplers = if i + 1 < levels { vec![Upsample2D::load(&mut block.pp("upsamplers").pp(0), c_out)] } else { Vec::new() };
                up_blocks.push(DecoderBlock { resnets, upsamplers });
                c_in = c_out;
            }
            Decoder {
                conv_in,
                mid_block,
                up_blocks,
                conv_norm_out: loader.group_norm("conv_norm_out", groups, channels[0], EPS),
                conv_out: loader.conv2d("conv_out", channels[0], config.out_channels, 3, 1, 1),
            }
        };
        Self { encoder, quant_conv, post_quant_conv, decoder }
    }

    /// Images in [-1, 1], `[batch, 3, H, W]` -> the latent distribution.
    pub fn encode(&self, image: Tensor<4>) -> LatentDistribution {
        Self::distribution(self.moments(image))
    }

    /// The encoder's output (after `quant_conv`): mean and log-variance
    /// side by side on the channel axis.
    fn moments(&self, image: Tensor<4>) -> Tensor<4> {
        let e = &self.encoder;
        let mut x = e.conv_in.forward(image);
        for block in &e.down_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(x, None);
            }
            for down in &block.downsamplers {
                x = down.forward(x);
            }
        }
        x = e.mid_block.forward(x);
        x = e.conv_out.forward(silu(e.conv_norm_out.forward(x)));
        match &self.quant_conv {
            Some(conv) => conv.forward(x),
            None => x,
        }
    }

    fn distribution(moments: Tensor<4>) -> LatentDistribution {
        let mut halves = moments.chunk(2, 1);
        let logvar = halves.pop().expect("two halves").clamp(-30.0, 20.0);
        let mean = halves.pop().expect("two halves");
        LatentDistribution { mean, logvar }
    }

    /// Latents (unscaled) -> images in about [-1, 1].
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let d = &self.decoder;
        let mut x = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents,
        };
        x = d.conv_in.forward(x);
        x = d.mid_block.forward(x);
        for block in &d.up_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(x, None);
            }
            for up in &block.upsamplers {
                x = up.forward(x);
            }
        }
        d.conv_out.forward(silu(d.conv_norm_out.forward(x)))
    }
}

/// Decoding and encoding in overlapping tiles, as diffusers' `enable_tiling`
/// does it: tiles of `tile_sample_size` pixels (that over the downscale
/// factor in latents) start every `1 - overlap` of a tile; each tile's
/// output is blended linearly into the one above and the one to its left
/// over `overlap` of a tile, then cropped, and the crops are joined. The
/// largest activation is then a tile's, so images whose activations exceed
/// what an adapter can bind (WebGPU guarantees 128 MiB per buffer) still
/// decode. Tiles see only their own surroundings (group norms and the mid
/// block's attention are per tile), so the result is close to, not equal
/// to, the untiled one; DEVELOPERS.md ("Tiled VAE") gives the figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiling {
    /// Tile side in pixels; a multiple of the VAE's downscale factor.
    pub tile_sample_size: usize,
    /// The share of a tile that overlaps its neighbour (diffusers: 0.25).
    pub overlap: f64,
}

/// WebGPU's guaranteed `maxStorageBufferBindingSize`: an activation larger
/// than this may not bind on a browser adapter (or on lavapipe).
pub const WEBGPU_BINDING_BYTES: u64 = 128 << 20;

impl VaeTiling {
    /// The largest decoder activation, in f32 bytes per pixel of the
    /// output image: at each level the wider of its own channels and the
    /// channels of the block above, upsampled into it.
    fn decoder_bytes_per_pixel(config: &VaeConfig) -> f64 {
        let channels = &config.block_out_channels;
        (0..channels.len()).map(|level| 4.0 * channels[level].max(*channels.get(level + 1).unwrap_or(&0)) as f64 / 4f64.powi(level as i32)).fold(0.0, f64::max)
    }

    /// The largest encoder activation, in f32 bytes per input pixel.
    fn encoder_bytes_per_pixel(config: &VaeConfig) -> f64 {
        let channels = &config.block_out_channels;
        (0..channels.len()).map(|level| 4.0 * channels[level] as f64 / 4f64.powi(level as i32)).fold(0.0, f64::max)
    }

    /// Tiles for decoding `batch` images of `height × width` pixels whose
    /// largest activation fits `budget` bytes; `None` when the whole image
    /// fits.
    pub fn for_decoding(config: &VaeConfig, batch: usize, height: usize, width: usize, budget: u64) -> Option<Self> {
        Self::within(config, Self::decoder_bytes_per_pixel(config) * batch as f64, height, width, budget)
    }

    /// Tiles for encoding, likewise.
    pub fn for_encoding(config: &VaeConfig, batch: usize, height: usize, width: usize, budget: u64) -> Option<Self> {
        Self::within(config, Self::encoder_bytes_per_pixel(config) * batch as f64, height, width, budget)
    }

    /// Tile sides are multiples of four latents, so the overlap and the
    /// crop fall on whole latents.
    fn within(config: &VaeConfig, per_pixel: f64, height: usize, width: usize, budget: u64) -> Option<Self> {
        if per_pixel * (height * width) as f64 <= budget as f64 {
            return None;
        }
        let step = 4 * config.downscale();
        let side = (budget as f64 / per_pixel).sqrt() as usize / step * step;
        Some(Self { tile_sample_size: side.max(step), overlap: 0.25 })
    }

    fn tile_latent_size(&self, config: &VaeConfig) -> usize {
        self.tile_sample_size / config.downscale()
    }
}

/// Tiles `input` (`tile` wide, starting every `stride`), maps each through
/// `f`, and joins the outputs blended over `blend` and cropped to
/// `tile_out - blend` (diffusers' `tiled_decode` / `_tiled_encode`).
fn tiled(input: Tensor<4>, tile: usize, stride: usize, tile_out: usize, blend: usize, f: impl Fn(Tensor<4>) -> Tensor<4>) -> Tensor<4> {
    let [_, _, height, width] = input.dims();
    let starts = |size: usize| (0..size).step_by(stride.max(1)).collect::<Vec<_>>();
    let (rows, columns) = (starts(height), starts(width));
    let crop = tile_out - blend;
    let mut above: Vec<Tensor<4>> = Vec::new();
    let mut joined_rows = Vec::new();
    for &i in &rows {
        let mut row: Vec<Tensor<4>> = Vec::new();
        for (index, &j) in columns.iter().enumerate() {
            let part = input.clone().narrow(2, i, tile.min(height - i)).narrow(3, j, tile.min(width - j));
            let mut out = f(part);
            // Blend with the (already blended) tiles above and to the left.
            if let Some(top) = above.get(index) {
                out = blend_into(top.clone(), out, blend, 2);
            }
            if let Some(left) = row.last() {
                out = blend_into(left.clone(), out, blend, 3);
            }
            row.push(out);
        }
        let cropped: Vec<Tensor<4>> = row
            .iter()
            .map(|t| {
                let [_, _, h, w] = t.dims();
                t.clone().narrow(2, 0, crop.min(h)).narrow(3, 0, crop.min(w))
            })
            .collect();
        joined_rows.push(Tensor::cat(cropped, 3));
        above = row;
    }
    Tensor::cat(joined_rows, 2)
}

/// `b`'s first `extent` rows (dim 2) or columns (dim 3) faded in from the
/// last ones of `a`: weight y/extent on `b`, the rest on `a`.
fn blend_into(a: Tensor<4>, b: Tensor<4>, extent: usize, dim: usize) -> Tensor<4> {
    let extent = extent.min(a.dims()[dim]).min(b.dims()[dim]);
    if extent == 0 {
        return b;
    }
    let device = b.device();
    let mut shape = [1, 1, 1, 1];
    shape[dim] = extent;
    let weights: Vec<f32> = (0..extent).map(|y| y as f32 / extent as f32).collect();
    let weight = Tensor::<1>::from_floats(weights.as_slice(), &device).reshape(shape);
    let a_len = a.dims()[dim];
    let b_len = b.dims()[dim];
    let faded = a.narrow(dim, a_len - extent, extent) * (weight.clone().neg() + 1.0) + b.clone().narrow(dim, 0, extent) * weight;
    if b_len == extent {
        faded
    } else {
        Tensor::cat(vec![faded, b.narrow(dim, extent, b_len - extent)], dim)
    }
}

impl AutoencoderKl {
    /// `decode`, in tiles when `tiling` is given and the latents are larger
    /// than one tile.
    pub fn decode_tiled(&self, latents: Tensor<4>, config: &VaeConfig, tiling: Option<VaeTiling>) -> Tensor<4> {
        let [_, _, h, w] = latents.dims();
        match tiling {
            Some(tiling) if h.max(w) > tiling.tile_latent_size(config) => {
                let tile = tiling.tile_latent_size(config);
                let stride = (tile as f64 * (1.0 - tiling.overlap)) as usize;
                let blend = (tiling.tile_sample_size as f64 * tiling.overlap) as usize;
                tiled(latents, tile, stride, tiling.tile_sample_size, blend, |tile| self.decode(tile))
            }
            _ => self.decode(latents),
        }
    }

    /// `encode`, in tiles when `tiling` is given and the image is larger
    /// than one tile (the distribution's parameters are blended).
    pub fn encode_tiled(&self, image: Tensor<4>, config: &VaeConfig, tiling: Option<VaeTiling>) -> LatentDistribution {
        let [_, _, h, w] = image.dims();
        match tiling {
            Some(tiling) if h.max(w) > tiling.tile_sample_size => {
                let tile_out = tiling.tile_latent_size(config);
                let stride = (tiling.tile_sample_size as f64 * (1.0 - tiling.overlap)) as usize;
                let blend = (tile_out as f64 * tiling.overlap) as usize;
                let moments = tiled(image, tiling.tile_sample_size, stride, tile_out, blend, |tile| self.moments(tile));
                Self::distribution(moments)
            }
            _ => self.encode(image),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::parse;
    use crate::models::standard::SD_VAE;

    #[test]
    fn sd_decoding_is_tiled_where_an_activation_would_exceed_the_budget() {
        let config: VaeConfig = parse(SD_VAE, "SD VAE").unwrap();
        // 512 px: up_blocks.2 upsamples 256 channels to 512x512, 256 MiB.
        assert_eq!(VaeTiling::decoder_bytes_per_pixel(&config), 1024.0);
        let tiling = VaeTiling::for_decoding(&config, 1, 512, 512, WEBGPU_BINDING_BYTES).expect("512 px needs tiles");
        assert_eq!(tiling.tile_sample_size, 352, "the largest multiple of 32 px whose activations fit 128 MiB");
        const { assert!(1024 * 352 * 352 <= WEBGPU_BINDING_BYTES) };
        assert_eq!(VaeTiling::for_decoding(&config, 1, 256, 256, WEBGPU_BINDING_BYTES), None);
        // Encoding holds at most 128 channels at full size: 512 px fits, 1024 px does not.
        assert_eq!(VaeTiling::for_encoding(&config, 1, 512, 512, WEBGPU_BINDING_BYTES), None);
        assert!(VaeTiling::for_encoding(&config, 1, 1024, 1024, WEBGPU_BINDING_BYTES).is_some());
    }
}
