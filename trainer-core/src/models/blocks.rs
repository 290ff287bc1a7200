//! Building blocks shared by the VAE and the UNet, named as in diffusers
//! (`resnets.N.norm1`, `attentions.N.to_q`, `downsamplers.0.conv`, ...).

use super::activation::silu;
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::tensor::Tensor;

use super::attention::attention;
use super::loader::Loader;
use super::lora::{LoraConv2d, LoraLinear};

/// diffusers' ResnetBlock2D.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: LoraConv2d,
    /// Projects the time embedding (UNet only).
    pub time_emb_proj: Option<LoraLinear>,
    pub norm2: GroupNorm,
    pub conv2: LoraConv2d,
    /// 1x1 convolution when the channel count changes.
    pub conv_shortcut: Option<LoraConv2d>,
}

/// The shape of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub c_in: usize,
    pub c_out: usize,
    /// The time embedding's width (the UNet's blocks; none in the VAE).
    pub temb: Option<usize>,
    pub groups: usize,
    pub eps: f64,
}

impl ResnetBlock2D {
    pub fn load(loader: &mut Loader<'_>, config: ResnetConfig) -> Self {
        let ResnetConfig { c_in, c_out, temb, groups, eps } = config;
        Self {
            norm1: loader.group_norm("norm1", groups, c_in, eps),
            conv1: loader.lora_conv2d("conv1", c_in, c_out, 3, 1, 1),
            time_emb_proj: temb.map(|t| loader.lora_linear("time_emb_proj", t, c_out, true)),
            norm2: loader.group_norm("norm2", groups, c_out, eps),
            conv2: loader.lora_conv2d("conv2", c_out, c_out, 3, 1, 1),
            conv_shortcut: (c_in != c_out).then(|| loader.lora_conv2d("conv_shortcut", c_in, c_out, 1, 1, 0)),
        }
    }

    pub fn forward(&self, x: Tensor<4>, temb: Option<Tensor<2>>) -> Tensor<4> {
        let mut h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        if let (Some(projection), Some(temb)) = (&self.time_emb_proj, temb) {
            let [batch, channels] = [h.dims()[0], h.dims()[1]];
            h = h + projection.forward(silu(temb)).reshape([batch, channels, 1, 1]);
        }
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        shortcut + h
    }

    /// Its convolutions, for LoCon adapters.
    pub fn convs(&self) -> Vec<&LoraConv2d> {
        let mut convs = vec![&self.conv1, &self.conv2];
        convs.extend(self.conv_shortcut.as_ref());
        convs
    }
}

/// diffusers' Attention: `to_q`, `to_k`, `to_v`, `to_out.0`, and in the
/// VAE a `group_norm` over the image it attends across.
#[derive(Module, Debug)]
pub struct Attention {
    pub group_norm: Option<GroupNorm>,
    pub to_q: LoraLinear,
    pub to_k: LoraLinear,
    pub to_v: LoraLinear,
    pub to_out_0: LoraLinear,
    #[module(skip)]
    pub heads: usize,
}

impl Attention {
    /// The UNet's attention (no biases on q, k, v).
    pub fn load(loader: &mut Loader<'_>, dim: usize, context_dim: usize, heads: usize) -> Self {
        Self::load_with(loader, None, dim, context_dim, heads, false)
    }

    /// The VAE's single-head attention over an image's positions: its
    /// input is group-normalised and its output added back (see
    /// [`forward_image`](Self::forward_image)); q, k, v have biases.
    pub fn load_spatial(loader: &mut Loader<'_>, channels: usize, groups: usize, eps: f64) -> Self {
        let group_norm = loader.group_norm("group_norm", groups, channels, eps);
        Self::load_with(loader, Some(group_norm), channels, channels, 1, true)
    }

    fn load_with(loader: &mut Loader<'_>, group_norm: Option<GroupNorm>, dim: usize, context_dim: usize, heads: usize, qkv_bias: bool) -> Self {
        Self {
            group_norm,
            to_q: loader.lora_linear("to_q", dim, dim, qkv_bias),
            to_k: loader.lora_linear("to_k", context_dim, dim, qkv_bias),
            to_v: loader.lora_linear("to_v", context_dim, dim, qkv_bias),
            to_out_0: loader.lora_linear("to_out.0", dim, dim, true),
            heads,
        }
    }

    /// Self-attention across the positions of `x` `[batch, channels, h, w]`,
    /// after the group norm, with the residual (the VAE's mid block).
    pub fn forward_image(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let normed = match &self.group_norm {
            Some(norm) => norm.forward(x.clone()),
            None => x.clone(),
        };
        let tokens = normed.reshape([b, c, h * w]).swap_dims(1, 2);
        self.forward(tokens, None).swap_dims(1, 2).reshape([b, c, h, w]) + x
    }

    /// `x`: [batch, tokens, dim]; `context`: [batch, context tokens, context dim]
    /// (self-attention when `None`).
    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let [batch, length, dim] = x.dims();
        let context = context.unwrap_or_else(|| x.clone());
        let context_length = context.dims()[1];
        let head_dim = dim / self.heads;
        let q = self.to_q.forward(x).reshape([batch, length, self.heads, head_dim]).swap_dims(1, 2);
        let k = self.to_k.forward(context.clone()).reshape([batch, context_length, self.heads, head_dim]).swap_dims(1, 2);
        let v = self.to_v.forward(context).reshape([batch, context_length, self.heads, head_dim]).swap_dims(1, 2);
        let out = attention(q, k, v).swap_dims(1, 2).reshape([batch, length, dim]);
        self.to_out_0.forward(out)
    }
}

/// Stride-2 convolution. The VAE pads asymmetrically (right and bottom by
/// one, `padding=0` in diffusers); the UNet pads by one on every side.
#[derive(Module, Debug)]
pub struct Downsample2D {
    pub conv: LoraConv2d,
    #[module(skip)]
    pub asymmetric: bool,
}

impl Downsample2D {
    pub fn load(loader: &mut Loader<'_>, channels: usize, asymmetric: bool) -> Self {
        let padding = if asymmetric { 0 } else { 1 };
        Self { conv: loader.lora_conv2d("conv", channels, channels, 3, 2, padding), asymmetric }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = if self.asymmetric { x.pad((0, 1, 0, 1), burn::tensor::ops::PadMode::Constant(0.0)) } else { x };
        self.conv.forward(x)
    }
}

/// Nearest-neighbour 2x upsampling, then a 3x3 convolution.
#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: LoraConv2d,
}

impl Upsample2D {
    pub fn load(loader: &mut Loader<'_>, channels: usize) -> Self {
        Self { conv: loader.lora_conv2d("conv", channels, channels, 3, 1, 1) }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.conv.forward(upsample_nearest_2x(x))
    }
}

pub fn upsample_nearest_2x(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1]).repeat_dim(3, 2).repeat_dim(5, 2).reshape([b, c, h * 2, w * 2])
}
