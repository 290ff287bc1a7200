//! UNet2DConditionModel for SD 1.x and 2.x, built from the model's
//! `config.json`. Field names follow diffusers' keys (`down_blocks.N.resnets.M`,
//! `down_blocks.N.attentions.M.transformer_blocks.K.attn1.to_q`, ...).

use super::activation::{gelu, silu};
use burn::module::Module;
use burn::nn::{GroupNorm, LayerNorm};
use burn::tensor::{Tensor, TensorData};

use super::blocks::{Attention, Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::config::UNetConfig;
use super::loader::Loader;
use super::lora::{LoraConv2d, LoraLinear};

/// The UNet's transformer blocks normalise with GroupNorm eps 1e-6.
const TRANSFORMER_NORM_EPS: f64 = 1e-6;

/// GEGLU feed-forward: `net.0` projects to twice the inner width and gates
/// one half with the other, `net.2` projects back (`net.1` is dropout).
#[derive(Module, Debug)]
pub struct FeedForward {
    pub net_0: Geglu,
    pub net_2: LoraLinear,
}

/// diffusers' GEGLU: `proj`, then the first half times GELU of the second.
#[derive(Module, Debug)]
pub struct Geglu {
    pub proj: LoraLinear,
}

impl FeedForward {
    fn load(loader: &mut Loader<'_>, dim: usize, inner: usize) -> Self {
        let proj = loader.pp("net.0").lora_linear("proj", dim, inner * 2, true);
        Self { net_0: Geglu { proj }, net_2: loader.lora_linear("net.2", inner, dim, true) }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mut halves = self.net_0.proj.forward(x).chunk(2, 2);
        let gate = halves.pop().expect("two halves");
        let hidden = halves.pop().expect("two halves");
        self.net_2.forward(hidden * gelu(gate))
    }
}

#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    fn load(loader: &mut Loader<'_>, config: &TransformerConfig) -> Self {
        let TransformerConfig { dim, context_dim, heads, .. } = *config;
        // One statement each: a scope borrows the loader until its statement ends.
        let norm1 = loader.layer_norm("norm1", dim, 1e-5);
        let attn1 = Attention::load(&mut loader.pp("attn1"), dim, dim, heads);
        let norm2 = loader.layer_norm("norm2", dim, 1e-5);
        let attn2 = Attention::load(&mut loader.pp("attn2"), dim, context_dim, heads);
        let norm3 = loader.layer_norm("norm3", dim, 1e-5);
        let ff = FeedForward::load(&mut loader.pp("ff"), dim, dim * 4);
        Self { norm1, attn1, norm2, attn2, norm3, ff }
    }

    fn forward(&self, x: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self.attn2.forward(self.norm2.forward(x.clone()), Some(context)) + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// Input/output projection of a Transformer2DModel: 1x1 convolution (SD 1.x)
/// or linear (SD 2.x, `use_linear_projection`).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per transformer: the size is nothing to save
pub enum Projection {
    Conv(LoraConv2d),
    Linear(LoraLinear),
}

#[derive(Module, Debug)]
pub struct Transformer2D {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

/// The shape of a [`Transformer2D`].
#[derive(Debug, Clone, Copy)]
struct TransformerConfig {
    dim: usize,
    context_dim: usize,
    heads: usize,
    /// Transformer blocks in it.
    depth: usize,
    groups: usize,
    /// Linear projections in and out (SD 2.x, SDXL) rather than 1x1 convolutions.
    linear: bool,
}

impl Transformer2D {
    fn load(loader: &mut Loader<'_>, config: &TransformerConfig) -> Self {
        let TransformerConfig { dim, depth, groups, linear, .. } = *config;
        let projection = |loader: &mut Loader<'_>, name: &str| {
            if linear {
                Projection::Linear(loader.lora_linear(name, dim, dim, true))
            } else {
                Projection::Conv(loader.lora_conv2d(name, dim, dim, 1, 1, 0))
            }
        };
        Self {
            norm: loader.group_norm("norm", groups, dim, TRANSFORMER_NORM_EPS),
            proj_in: projection(loader, "proj_in"),
            transformer_blocks: (0..depth).map(|k| BasicTransformerBlock::load(&mut loader.pp("transformer_blocks").pp(k), config)).collect(),
            proj_out: projection(loader, "proj_out"),
        }
    }

    fn forward(&self, x: Tensor<4>, context: Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = self.norm.forward(x);
        let to_tokens = |x: Tensor<4>| x.reshape([b, c, h * w]).swap_dims(1, 2);
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(x)),
            Projection::Linear(linear) => linear.forward(to_tokens(x)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context.clone());
        }
        let to_image = |t: Tensor<3>| t.swap_dims(1, 2).reshape([b, c, h, w]);
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(to_image(tokens)),
            Projection::Linear(linear) => to_image(linear.forward(tokens)),
        };
        out + residual
    }
}

#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2D>,
    /// One, except in the last block.
    pub downsamplers: Vec<Downsample2D>,
}

#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2D>,
    /// One, except in the last block.
    pub upsamplers: Vec<Upsample2D>,
}

#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// One, between the two resnets.
    pub attentions: Vec<Transformer2D>,
}

#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: LoraLinear,
    pub linear_2: LoraLinear,
}

impl TimestepEmbedding {
    fn load(loader: &mut Loader<'_>, input: usize, width: usize) -> Self {
        Self { linear_1: loader.lora_linear("linear_1", input, width, true), linear_2: loader.lora_linear("linear_2", width, width, true) }
    }
}

/// SDXL's added conditioning (`addition_embed_type: text_time`): the second
/// text encoder's pooled, projected embedding and per item the six size
/// ids (original height, width; crop top, left; target height, width).
#[derive(Debug, Clone)]
pub struct AddedConditions {
    pub pooled: Tensor<2>,
    pub time_ids: Vec<[f32; 6]>,
}

#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    pub conv_in: LoraConv2d,
    pub time_embedding: TimestepEmbedding,
    /// SDXL: embeds `[pooled, sinusoidal(time ids)]`, added to the time embedding.
    pub add_embedding: Option<TimestepEmbedding>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: LoraConv2d,
    #[module(skip)]
    pub time_channels: usize,
    #[module(skip)]
    pub flip_sin_to_cos: bool,
    #[module(skip)]
    pub freq_shift: f64,
    /// Sinusoidal width of each SDXL time id (`addition_time_embed_dim`, diffusers' default 256).
    #[module(skip)]
    pub addition_time_embed_dim: usize,
}

impl UNet2DConditionModel {
    pub fn load(config: &UNetConfig, loader: &mut Loader<'_>) -> Self {
        let channels = &config.block_out_channels;
        let levels = channels.len();
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let temb = config.time_embed_dim();
        let linear = config.use_linear_projection;
        let lpb = config.layers_per_block;

        // A Transformer2D with the settings of down level `level`.
        let transformer = |loader: &mut Loader<'_>, dim: usize, level: usize| {
            let settings = TransformerConfig {
                dim,
                context_dim: config.cross_attention_dim.get(level),
                heads: config.heads(level),
                depth: config.transformer_layers_per_block.get(level),
                groups,
                linear,
            };
            Transformer2D::load(loader, &settings)
        };
        let resnet = |c_in, c_out| ResnetConfig { c_in, c_out, temb: Some(temb), groups, eps };
        let time_embedding = TimestepEmbedding::load(&mut loader.pp("time_embedding"), channels[0], temb);
        let conv_in = loader.lora_conv2d("conv_in", config.in_channels, channels[0], 3, 1, 1);
        let add_embedding = match config.addition_embed_type.as_deref() {
            Some("text_time") => {
                let input = config.projection_class_embeddings_input_dim.unwrap_or(2816);
                Some(TimestepEmbedding::load(&mut loader.pp("add_embedding"), input, temb))
            }
            _ => None,
        };

        let mut down_blocks = Vec::new();
        let mut c_out = channels[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let c_in = c_out;
            c_out = channels[i];
            let mut blocks = loader.pp("down_blocks");
            let mut block = blocks.pp(i);
            let cross = kind.starts_with("CrossAttn");
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..lpb {
                let input = if j == 0 { c_in } else { c_out };
                resnets.push(ResnetBlock2D::load(&mut block.pp("resnets").pp(j), resnet(input, c_out)));
                if cross {
                    attentions.push(transformer(&mut block.pp("attentions").pp(j), c_out, i));
                }
            }
            let downsamplers = if i + 1 < levels { vec![Downsample2D::load(&mut block.pp("downsamplers").pp(0), c_out, false)] } else { Vec::new() };
            down_blocks.push(DownBlock { resnets, attentions, downsamplers });
        }

        let top = channels[levels - 1];
        let mid_block = {
            let mut mid = loader.pp("mid_block");
            let first = ResnetBlock2D::load(&mut mid.pp("resnets").pp(0), resnet(top, top));
            let second = ResnetBlock2D::load(&mut mid.pp("resnets").pp(1), resnet(top, top));
            let attention = transformer(&mut mid.pp("attentions").pp(0), top, levels - 1);
            MidBlock { resnets: vec![first, second], attentions: vec![attention] }
        };

        let mut up_blocks = Vec::new();
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut previous = reversed[0];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let c_out = reversed[i];
            let skip_in = reversed[(i + 1).min(levels - 1)];
            let level = levels - 1 - i; // the matching down level, for per-block settings
            let mut blocks = loader.pp("up_blocks");
            let mut block = blocks.pp(i);
            let cross = kind.starts_with("CrossAttn");
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..=lpb {
                let skip = if j == lpb { skip_in } else { c_out };
                let input = if j == 0 { previous } else { c_out };
                resnets.push(ResnetBlock2D::load(&mut block.pp("resnets").pp(j), resnet(input + skip, c_out)));
                if cross {
                    attentions.push(transformer(&mut block.pp("attentions").pp(j), c_out, level));
                }
            }
            let upsamplers = if i + 1 < levels { vec![Upsample2D::load(&mut block.pp("upsamplers").pp(0), c_out)] } else { Vec::new() };
            up_blocks.push(UpBlock { resnets, attentions, upsamplers });
            previous = c_out;
        }

        Self {
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: loader.group_norm("conv_norm_out", groups, channels[0], eps),
            conv_out: loader.lora_conv2d("conv_out", channels[0], config.out_channels, 3, 1, 1),
            time_channels: channels[0],
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift,
            addition_time_embed_dim: config.addition_time_embed_dim.unwrap_or(256),
        }
    }

    /// Sinusoidal timestep features (diffusers' `get_timestep_embedding`).
    pub fn timestep_features(&self, timesteps: &[f32], device: &burn::tensor::Device) -> Tensor<2> {
        self.sinusoidal(timesteps, self.time_channels, device)
    }

    /// `dim` sinusoidal features of each value, `[values, dim]`.
    fn sinusoidal(&self, values: &[f32], dim: usize, device: &burn::tensor::Device) -> Tensor<2> {
        let half = dim / 2;
        let mut out = Vec::with_capacity(values.len() * dim);
        for &t in values {
            let angles: Vec<f64> = (0..half).map(|k| t as f64 * (-(10000f64.ln()) * k as f64 / (half as f64 - self.freq_shift)).exp()).collect();
            let (sin, cos): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.sin() as f32, a.cos() as f32)).unzip();
            if self.flip_sin_to_cos {
                out.extend(cos);
                out.extend(sin);
            } else {
                out.extend(sin);
                out.extend(cos);
            }
        }
        Tensor::from_data(TensorData::new(out, [values.len(), dim]), device)
    }

    /// Whether the model needs [`AddedConditions`] (SDXL).
    pub fn needs_added_conditions(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// Predicts noise (or v) for `sample` `[batch, 4, h, w]` at `timesteps`
    /// (one per batch item) given `context` `[batch, 77, dim]` (SD 1.x/2.x).
    pub fn forward(&self, sample: Tensor<4>, timesteps: &[f32], context: Tensor<3>) -> Tensor<4> {
        self.forward_with(sample, timesteps, context, None)
    }

    /// [`forward`](Self::forward) with SDXL's added conditions.
    pub fn forward_with(&self, sample: Tensor<4>, timesteps: &[f32], context: Tensor<3>, added: Option<&AddedConditions>) -> Tensor<4> {
        let temb = self.time_embedding_of(timesteps, added, &sample.device());
        let mut x = sample;
        let mut skips = Vec::new();
        for step in self.stages() {
            let skip = step.takes_skip.then(|| skips.pop().expect("one skip per up-block resnet"));
            x = self.run_stage(step.stage, x, skip, &temb, &context);
            if step.keeps_skip {
                skips.push(x.clone());
            }
        }
        x
    }

    /// The time embedding every resnet adds: the timesteps' sinusoidal
    /// features through `time_embedding`, plus SDXL's added conditions.
    pub fn time_embedding_of(&self, timesteps: &[f32], added: Option<&AddedConditions>, device: &burn::tensor::Device) -> Tensor<2> {
        let features = self.timestep_features(timesteps, device);
        let temb = self.time_embedding.linear_2.forward(silu(self.time_embedding.linear_1.forward(features)));
        match (&self.add_embedding, added) {
            (Some(embedding), Some(added)) => {
                let batch = added.time_ids.len();
                let ids: Vec<f32> = added.time_ids.iter().flatten().copied().collect();
                let time = self.sinusoidal(&ids, self.addition_time_embed_dim, device).reshape([batch, 6 * self.addition_time_embed_dim]);
                let time = super::layers::in_dtype(time, added.pooled.dtype());
                let input = Tensor::cat(vec![added.pooled.clone(), time], 1);
                temb + embedding.linear_2.forward(silu(embedding.linear_1.forward(input)))
            }
            (Some(_), None) => panic!("this UNet (SDXL) needs the pooled text embedding and time ids"),
            (None, _) => temb,
        }
    }

    /// The forward pass as a list of stages: conv_in, each down block's
    /// resnets, transformers and downsampler, the mid block's three parts,
    /// each up block's resnets, transformers and upsampler, and the output
    /// head. Gradient checkpointing recomputes one stage at a time.
    pub fn stages(&self) -> Vec<StageStep> {
        let step = |stage, takes_skip, keeps_skip| StageStep { stage, takes_skip, keeps_skip };
        let mut steps = vec![step(Stage::ConvIn, false, true)];
        for (block, down) in self.down_blocks.iter().enumerate() {
            for layer in 0..down.resnets.len() {
                let attention = layer < down.attentions.len();
                steps.push(step(Stage::DownResnet { block, layer }, false, !attention));
                if attention {
                    steps.push(step(Stage::DownAttention { block, layer }, false, true));
                }
            }
            if !down.downsamplers.is_empty() {
                steps.push(step(Stage::Downsample { block }, false, true));
            }
        }
        steps.extend([
            step(Stage::MidResnet { layer: 0 }, false, false),
            step(Stage::MidAttention, false, false),
            step(Stage::MidResnet { layer: 1 }, false, false),
        ]);
        for (block, up) in self.up_blocks.iter().enumerate() {
            for layer in 0..up.resnets.len() {
                steps.push(step(Stage::UpResnet { block, layer }, true, false));
                if layer < up.attentions.len() {
                    steps.push(step(Stage::UpAttention { block, layer }, false, false));
                }
            }
            if !up.upsamplers.is_empty() {
                steps.push(step(Stage::Upsample { block }, false, false));
            }
        }
        steps.push(step(Stage::Out, false, false));
        steps
    }

    /// Runs one stage on `x` (the sample for `ConvIn`); up-block resnets
    /// also take their skip connection.
    pub fn run_stage(&self, stage: Stage, x: Tensor<4>, skip: Option<Tensor<4>>, temb: &Tensor<2>, context: &Tensor<3>) -> Tensor<4> {
        let temb = || Some(temb.clone());
        match stage {
            Stage::ConvIn => self.conv_in.forward(x),
            Stage::DownResnet { block, layer } => self.down_blocks[block].resnets[layer].forward(x, temb()),
            Stage::DownAttention { block, layer } => self.down_blocks[block].attentions[layer].forward(x, context.clone()),
            Stage::Downsample { block } => self.down_blocks[block].downsamplers[0].forward(x),
            Stage::MidResnet { layer } => self.mid_block.resnets[layer].forward(x, temb()),
            Stage::MidAttention => self.mid_block.attentions[0].forward(x, context.clone()),
            Stage::UpResnet { block, layer } => {
                let skip = skip.expect("an up-block resnet takes a skip connection");
                self.up_blocks[block].resnets[layer].forward(Tensor::cat(vec![x, skip], 1), temb())
            }
            Stage::UpAttention { block, layer } => self.up_blocks[block].attentions[layer].forward(x, context.clone()),
            Stage::Upsample { block } => self.up_blocks[block].upsamplers[0].forward(x),
            Stage::Out => self.conv_out.forward(silu(self.conv_norm_out.forward(x))),
        }
    }
}

/// One part of the UNet's forward pass (see [`UNet2DConditionModel::stages`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    ConvIn,
    DownResnet { block: usize, layer: usize },
    DownAttention { block: usize, layer: usize },
    Downsample { block: usize },
    MidResnet { layer: usize },
    MidAttention,
    UpResnet { block: usize, layer: usize },
    UpAttention { block: usize, layer: usize },
    Upsample { block: usize },
    Out,
}

/// A stage and how it uses the skip connections: down-block outputs are
/// kept for the up blocks, whose resnets take them last-in first-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageStep {
    pub stage: Stage,
    /// Pops the most recent skip and concatenates it to its input.
    pub takes_skip: bool,
    /// Its output is also kept as a skip.
    pub keeps_skip: bool,
}

impl Transformer2D {
    /// Its adaptable Linear layers in module order: projections (when
    /// linear), then each block's attn1, attn2 and feed-forward.
    fn lora_layers(&self) -> Vec<&LoraLinear> {
        let mut layers: Vec<&LoraLinear> = [&self.proj_in, &self.proj_out]
            .into_iter()
            .filter_map(|p| match p {
                Projection::Linear(linear) => Some(linear),
                Projection::Conv(_) => None,
            })
            .collect();
        for b in &self.transformer_blocks {
            layers.extend([
                &b.attn1.to_q,
                &b.attn1.to_k,
                &b.attn1.to_v,
                &b.attn1.to_out_0,
                &b.attn2.to_q,
                &b.attn2.to_k,
                &b.attn2.to_v,
                &b.attn2.to_out_0,
                &b.ff.net_0.proj,
                &b.ff.net_2,
            ]);
        }
        layers
    }

    /// Its adaptable Linear layers (as [`lora_layers`](Self::lora_layers))
    /// and SD 1.x's 1x1 convolution projections.
    fn adaptable_mut(&mut self) -> (Vec<&mut LoraLinear>, Vec<&mut LoraConv2d>) {
        let (mut layers, mut convs) = (Vec::new(), Vec::new());
        for projection in [&mut self.proj_in, &mut self.proj_out] {
            match projection {
                Projection::Linear(linear) => layers.push(linear),
                Projection::Conv(conv) => convs.push(conv),
            }
        }
        for b in &mut self.transformer_blocks {
            let (a1, a2, ff) = (&mut b.attn1, &mut b.attn2, &mut b.ff);
            layers.extend([
                &mut a1.to_q,
                &mut a1.to_k,
                &mut a1.to_v,
                &mut a1.to_out_0,
                &mut a2.to_q,
                &mut a2.to_k,
                &mut a2.to_v,
                &mut a2.to_out_0,
                &mut ff.net_0.proj,
                &mut ff.net_2,
            ]);
        }
        (layers, convs)
    }

    /// Its 1x1 convolution projections (SD 1.x).
    fn convs(&self) -> Vec<&LoraConv2d> {
        [&self.proj_in, &self.proj_out]
            .into_iter()
            .filter_map(|p| match p {
                Projection::Conv(conv) => Some(conv),
                Projection::Linear(_) => None,
            })
            .collect()
    }
}

impl TimestepEmbedding {
    fn layers(&self) -> [&LoraLinear; 2] {
        [&self.linear_1, &self.linear_2]
    }

    fn layers_mut(&mut self) -> [&mut LoraLinear; 2] {
        [&mut self.linear_1, &mut self.linear_2]
    }
}

impl UNet2DConditionModel {
    fn transformers(&self) -> Vec<&Transformer2D> {
        let mut all: Vec<&Transformer2D> = self.down_blocks.iter().flat_map(|b| &b.attentions).collect();
        all.extend(&self.mid_block.attentions);
        all.extend(self.up_blocks.iter().flat_map(|b| &b.attentions));
        all
    }

    fn resnets(&self) -> Vec<&ResnetBlock2D> {
        let mut all: Vec<&ResnetBlock2D> = self.down_blocks.iter().flat_map(|b| &b.resnets).collect();
        all.extend(&self.mid_block.resnets);
        all.extend(self.up_blocks.iter().flat_map(|b| &b.resnets));
        all
    }

    /// Every layer that can carry an adapter, block by block: the Linear
    /// layers (the transformers', the resnets' time projections, the time
    /// embeddings: LyCORIS presets adapt those too) and the convolutions
    /// (conv_in, the resnets', the samplers', SD 1.x's projections, conv_out).
    pub fn adaptable_mut(&mut self) -> (Vec<&mut LoraLinear>, Vec<&mut LoraConv2d>) {
        let (mut layers, mut convs) = (Vec::new(), Vec::new());
        let Self { conv_in, time_embedding, add_embedding, down_blocks, mid_block, up_blocks, conv_out, .. } = self;
        convs.push(conv_in);
        let down = down_blocks.iter_mut().map(|b| (&mut b.resnets, &mut b.attentions, b.downsamplers.iter_mut().map(|d| &mut d.conv).collect::<Vec<_>>()));
        let mid = std::iter::once((&mut mid_block.resnets, &mut mid_block.attentions, Vec::new()));
        let up = up_blocks.iter_mut().map(|b| (&mut b.resnets, &mut b.attentions, b.upsamplers.iter_mut().map(|u| &mut u.conv).collect::<Vec<_>>()));
        for (resnets, attentions, samplers) in down.chain(mid).chain(up) {
            for transformer in attentions.iter_mut() {
                let (linear, projections) = transformer.adaptable_mut();
                layers.extend(linear);
                convs.extend(projections);
            }
            for resnet in resnets.iter_mut() {
                let ResnetBlock2D { conv1, conv2, conv_shortcut, time_emb_proj, .. } = resnet;
                layers.extend(time_emb_proj.as_mut());
                convs.extend([conv1, conv2]);
                convs.extend(conv_shortcut.as_mut());
            }
            convs.extend(samplers);
        }
        layers.extend(time_embedding.layers_mut());
        layers.extend(add_embedding.iter_mut().flat_map(|e| e.layers_mut()));
        convs.push(conv_out);
        (layers, convs)
    }

    /// Every Linear layer that can carry an adapter (see [`adaptable_mut`](Self::adaptable_mut)).
    pub fn lora_layers_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.adaptable_mut().0
    }

    /// The Linear layers that carry an adapter now: the transformers' in
    /// module order, then the resnets' and the time embeddings'.
    pub fn adapted_layers(&self) -> Vec<&LoraLinear> {
        let mut all: Vec<&LoraLinear> = self.transformers().into_iter().flat_map(|t| t.lora_layers()).collect();
        all.extend(self.resnets().into_iter().filter_map(|r| r.time_emb_proj.as_ref()));
        all.extend(self.time_embedding.layers());
        all.extend(self.add_embedding.iter().flat_map(|e| e.layers()));
        all.into_iter().filter(|l| l.is_adapted()).collect()
    }

    /// The convolutions that carry a LoCon adapter now.
    pub fn adapted_convs(&self) -> Vec<&LoraConv2d> {
        let mut all: Vec<&LoraConv2d> = vec![&self.conv_in];
        all.extend(self.resnets().into_iter().flat_map(|r| r.convs()));
        all.extend(self.transformers().into_iter().flat_map(|t| t.convs()));
        all.extend(self.down_blocks.iter().flat_map(|b| b.downsamplers.iter().map(|d| &d.conv)));
        all.extend(self.up_blocks.iter().flat_map(|b| b.upsamplers.iter().map(|u| &u.conv)));
        all.push(&self.conv_out);
        all.into_iter().filter(|c| c.is_adapted()).collect()
    }

    /// A copy without adapters (the base model's prediction); tensors are shared, not copied.
    pub fn without_lora(&self) -> Self {
        let mut copy = self.clone();
        let (layers, convs) = copy.adaptable_mut();
        for layer in layers {
            layer.detach_adapter();
        }
        for conv in convs {
            conv.detach_adapter();
        }
        copy
    }
}
