//! AutoencoderKL: images to latent distributions and latents back to images.
//! Field names follow diffusers' keys (`encoder.down_blocks.N.resnets.M`, ...).

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::tensor::activation::silu;
use burn::tensor::Tensor;

use super::blocks::{Attention, Downsample2D, ResnetBlock2D, Upsample2D};
use super::config::VaeConfig;
use super::layers::Conv2d;
use super::loader::Loader;

/// The VAE's blocks use GroupNorm eps 1e-6 (the UNet's 1e-5).
const EPS: f64 = 1e-6;

/// Attention over all positions, with a group norm and a residual.
#[derive(Module, Debug)]
pub struct SpatialAttention {
    pub group_norm: GroupNorm,
    pub attention: Attention,
}

impl SpatialAttention {
    fn load(loader: &mut Loader<'_>, prefix: &str, channels: usize, groups: usize) -> Self {
        Self {
            group_norm: loader.group_norm(&format!("{prefix}.group_norm"), groups, channels, EPS),
            attention: Attention::load(loader, prefix, channels, channels, 1, true),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens = self.group_norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
        let out = self.attention.forward(tokens, None).swap_dims(1, 2).reshape([b, c, h, w]);
        out + x
    }
}

#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attention: Option<SpatialAttention>,
}

impl MidBlock {
    fn load(loader: &mut Loader<'_>, prefix: &str, channels: usize, groups: usize, attention: bool) -> Self {
        let first = ResnetBlock2D::load(loader, &format!("{prefix}.resnets.0"), channels, channels, None, groups, EPS);
        let attention = attention.then(|| SpatialAttention::load(loader, &format!("{prefix}.attentions.0"), channels, groups));
        let second = ResnetBlock2D::load(loader, &format!("{prefix}.resnets.1"), channels, channels, None, groups, EPS);
        Self { resnets: vec![first, second], attention }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        if let Some(attention) = &self.attention {
            x = attention.forward(x);
        }
        self.resnets[1].forward(x, None)
    }
}

#[derive(Module, Debug)]
pub struct EncoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
}

#[derive(Module, Debug)]
pub struct DecoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsampler: Option<Upsample2D>,
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

        let mut down_blocks = Vec::new();
        let mut c_in = channels[0];
        for (i, &c_out) in channels.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let resnets = (0..config.layers_per_block)
                .map(|j| ResnetBlock2D::load(loader, &format!("{p}.resnets.{j}"), if j == 0 { c_in } else { c_out }, c_out, None, groups, EPS))
                .collect();
            let downsampler = (i + 1 < levels).then(|| Downsample2D::load(loader, &format!("{p}.downsamplers.0"), c_out, true));
            down_blocks.push(EncoderBlock { resnets, downsampler });
            c_in = c_out;
        }
        let encoder = Encoder {
            conv_in: loader.conv2d("encoder.conv_in", config.in_channels, channels[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock::load(loader, "encoder.mid_block", top, groups, config.mid_block_add_attention),
            conv_norm_out: loader.group_norm("encoder.conv_norm_out", groups, top, EPS),
            conv_out: loader.conv2d("encoder.conv_out", top, 2 * latent, 3, 1, 1),
        };
        let quant_conv = config.use_quant_conv.then(|| loader.conv2d("quant_conv", 2 * latent, 2 * latent, 1, 1, 0));
        let post_quant_conv = config.use_post_quant_conv.then(|| loader.conv2d("post_quant_conv", latent, latent, 1, 1, 0));

        let decoder_conv_in = loader.conv2d("decoder.conv_in", latent, top, 3, 1, 1);
        let decoder_mid = MidBlock::load(loader, "decoder.mid_block", top, groups, config.mid_block_add_attention);
        let mut up_blocks = Vec::new();
        let mut c_in = top;
        for (i, &c_out) in channels.iter().rev().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| ResnetBlock2D::load(loader, &format!("{p}.resnets.{j}"), if j == 0 { c_in } else { c_out }, c_out, None, groups, EPS))
                .collect();
            let upsampler = (i + 1 < levels).then(|| Upsample2D::load(loader, &format!("{p}.upsamplers.0"), c_out));
            up_blocks.push(DecoderBlock { resnets, upsampler });
            c_in = c_out;
        }
        let decoder = Decoder {
            conv_in: decoder_conv_in,
            mid_block: decoder_mid,
            up_blocks,
            conv_norm_out: loader.group_norm("decoder.conv_norm_out", groups, channels[0], EPS),
            conv_out: loader.conv2d("decoder.conv_out", channels[0], config.out_channels, 3, 1, 1),
        };
        Self { encoder, quant_conv, post_quant_conv, decoder }
    }

    /// Images in [-1, 1], `[batch, 3, H, W]` -> the latent distribution.
    pub fn encode(&self, image: Tensor<4>) -> LatentDistribution {
        let e = &self.encoder;
        let mut x = e.conv_in.forward(image);
        for block in &e.down_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(x, None);
            }
            if let Some(down) = &block.downsampler {
                x = down.forward(x);
            }
        }
        x = e.mid_block.forward(x);
        x = e.conv_out.forward(silu(e.conv_norm_out.forward(x)));
        if let Some(conv) = &self.quant_conv {
            x = conv.forward(x);
        }
        let mut halves = x.chunk(2, 1);
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
            if let Some(up) = &block.upsampler {
                x = up.forward(x);
            }
        }
        d.conv_out.forward(silu(d.conv_norm_out.forward(x)))
    }
}
