//! The CLIP text encoder (transformers' CLIPTextModel, optionally with the
//! projection of CLIPTextModelWithProjection). Field names follow the
//! checkpoint keys: `embeddings.token_embedding`, `encoder.layers.N.self_attn.q_proj`, ...

use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::activation::{gelu, sigmoid, softmax};
use burn::tensor::{Bool, Int, Tensor};

use super::config::ClipTextConfig;
use super::layers::{Embedding, Linear};
use super::loader::Loader;
use super::lora::LoraLinear;

#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub out_proj: LoraLinear,
    #[module(skip)]
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: LoraLinear,
    pub fc2: LoraLinear,
    #[module(skip)]
    pub quick_gelu: bool,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

#[derive(Module, Debug)]
pub struct ClipTextModel {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
    /// Present for CLIPTextModelWithProjection (SDXL's second encoder).
    pub text_projection: Option<Linear>,
    #[module(skip)]
    pub eos_token_id: u32,
}

/// What the encoder returns.
pub struct ClipOutput {
    /// After the final layer norm: what SD 1.x/2.x feed the UNet.
    pub last_hidden_state: Tensor<3>,
    /// Output of every layer before the final norm; `hidden_states[0]` is
    /// the embeddings (as transformers' `output_hidden_states`).
    pub hidden_states: Vec<Tensor<3>>,
    /// The projected end-of-text embedding (only with a projection).
    pub text_embeds: Option<Tensor<2>>,
}

impl ClipAttention {
    fn forward(&self, x: Tensor<3>, mask: Tensor<4, Bool>) -> Tensor<3> {
        let [batch, length, width] = x.dims();
        let head_dim = width / self.heads;
        let split = |t: Tensor<3>| t.reshape([batch, length, self.heads, head_dim]).swap_dims(1, 2);
        let q = split(self.q_proj.forward(x.clone())) * (head_dim as f64).powf(-0.5);
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let scores = q.matmul(k.swap_dims(2, 3)).mask_fill(mask, f32::NEG_INFINITY);
        let out = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([batch, length, width]);
        self.out_proj.forward(out)
    }
}

impl ClipMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.fc1.forward(x);
        let h = if self.quick_gelu { h.clone() * sigmoid(h * 1.702) } else { gelu(h) };
        self.fc2.forward(h)
    }
}

impl ClipTextModel {
    /// Loads from tensors under `prefix` (e.g. `text_model.`), diffusers/HF names.
    pub fn load(config: &ClipTextConfig, loader: &mut Loader<'_>, prefix: &str, with_projection: bool) -> Self {
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let quick_gelu = config.hidden_act == super::config::ClipActivation::QuickGelu;
        // Adapters are named by transformers' module path whatever prefix
        // the file uses (kohya: `lora_te_text_model_encoder_layers_0_self_attn_q_proj`).
        let linear = |loader: &mut Loader<'_>, i: usize, name: &str, d_in: usize, d_out: usize| {
            let path = format!("encoder.layers.{i}.{name}");
            LoraLinear::new(loader.linear(&format!("{prefix}{path}"), d_in, d_out, true), format!("text_model.{path}"))
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("{prefix}encoder.layers.{i}");
                ClipEncoderLayer {
                    self_attn: ClipAttention {
                        q_proj: linear(loader, i, "self_attn.q_proj", d, d),
                        k_proj: linear(loader, i, "self_attn.k_proj", d, d),
                        v_proj: linear(loader, i, "self_attn.v_proj", d, d),
                        out_proj: linear(loader, i, "self_attn.out_proj", d, d),
                        heads: config.num_attention_heads,
                    },
                    layer_norm1: loader.layer_norm(&format!("{p}.layer_norm1"), d, eps),
                    mlp: ClipMlp {
                        fc1: linear(loader, i, "mlp.fc1", d, config.intermediate_size),
                        fc2: linear(loader, i, "mlp.fc2", config.intermediate_size, d),
                        quick_gelu,
                    },
                    layer_norm2: loader.layer_norm(&format!("{p}.layer_norm2"), d, eps),
                }
            })
            .collect();
        Self {
            token_embedding: loader.embedding(&format!("{prefix}embeddings.token_embedding.weight"), config.vocab_size, d),
            position_embedding: loader.embedding(&format!("{prefix}embeddings.position_embedding.weight"), config.max_position_embeddings, d),
            layers,
            final_layer_norm: loader.layer_norm(&format!("{prefix}final_layer_norm"), d, eps),
            text_projection: with_projection.then(|| loader.linear("text_projection", d, config.projection_dim.unwrap_or(d), false)),
            eos_token_id: config.eos_token_id.unwrap_or(49407),
        }
    }

    /// Encodes token ids `[batch, 77]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> ClipOutput {
        let [batch, length] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..length as i64, &device).reshape([1, length]).repeat_dim(0, batch);
        let mut x = self.token_embedding.forward(ids.clone()) + self.position_embedding.forward(positions);
        // Causal: each token sees itself and the tokens before it.
        let mask = Tensor::<2, Bool>::tril_mask([length, length], 0, &device).reshape([1, 1, length, length]).repeat_dim(0, batch);
        let mut hidden_states = vec![x.clone()];
        for layer in &self.layers {
            let h = layer.self_attn.forward(layer.layer_norm1.forward(x.clone()), mask.clone().repeat_dim(1, layer.self_attn.heads));
            x = x + h;
            let h = layer.mlp.forward(layer.layer_norm2.forward(x.clone()));
            x = x + h;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(x);
        let text_embeds = self.text_projection.as_ref().map(|projection| {
            // The first end-of-text position of each sequence.
            let eos = ids.equal_elem(self.eos_token_id as i64).int().argmax(1).reshape([batch]);
            let width = last_hidden_state.dims()[2];
            let pooled = last_hidden_state.clone().select(1, eos.clone());
            // select gathers every sequence's eos row for every batch item: keep the diagonal.
            let rows: Vec<Tensor<2>> = (0..batch).map(|b| pooled.clone().slice([b..b + 1, b..b + 1, 0..width]).reshape([1, width])).collect();
            projection.forward(Tensor::cat(rows, 0))
        });
        ClipOutput { last_hidden_state, hidden_states, text_embeds }
    }

    /// Every layer that can take a LoRA adapter (attention and MLP), in module order.
    pub fn lora_layers_mut(&mut self) -> Vec<&mut LoraLinear> {
        let mut all = Vec::new();
        for layer in &mut self.layers {
            let (attention, mlp) = (&mut layer.self_attn, &mut layer.mlp);
            all.extend([&mut attention.q_proj, &mut attention.k_proj, &mut attention.v_proj, &mut attention.out_proj, &mut mlp.fc1, &mut mlp.fc2]);
        }
        all
    }

    /// The layers that carry an adapter now, in module order.
    pub fn adapted_layers(&self) -> Vec<&LoraLinear> {
        let mut all = Vec::new();
        for layer in &self.layers {
            let (attention, mlp) = (&layer.self_attn, &layer.mlp);
            all.extend([&attention.q_proj, &attention.k_proj, &attention.v_proj, &attention.out_proj, &mlp.fc1, &mlp.fc2]);
        }
        all.retain(|l| l.lora.is_some());
        all
    }

    /// A copy without adapters (the base encoder); tensors are shared, not copied.
    pub fn without_lora(&self) -> Self {
        let mut copy = self.clone();
        for layer in copy.lora_layers_mut() {
            layer.lora = None;
        }
        copy
    }

    /// The hidden state SD 1.x uses with `clip_skip` (0 = last layer):
    /// the output `clip_skip` layers before the last, through the final norm.
    pub fn encode_with_clip_skip(&self, ids: Tensor<2, Int>, clip_skip: usize) -> Tensor<3> {
        let output = self.forward(ids);
        if clip_skip == 0 {
            return output.last_hidden_state;
        }
        let index = output.hidden_states.len() - 1 - clip_skip;
        self.final_layer_norm.forward(output.hidden_states[index].clone())
    }
}
