//! The CLIP text encoder (transformers' CLIPTextModel, optionally with the
//! projection of CLIPTextModelWithProjection). Field names follow the
//! checkpoint keys under `text_model.` (see [`transformers_key`]):
//! `embeddings.token_embedding`, `encoder.layers.N.self_attn.q_proj`, ...

use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{Bool, Int, Tensor};

use super::activation::gelu;
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
pub struct ClipTextEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

/// transformers' `text_model` (CLIPTextTransformer) and, for SDXL's second
/// encoder, the `text_projection` beside it.
#[derive(Module, Debug)]
pub struct ClipTextModel {
    pub embeddings: ClipTextEmbeddings,
    pub encoder: ClipEncoder,
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

/// The key transformers gives the tensor this module names `name`:
/// everything but SDXL's `text_projection` sits under `text_model.`.
pub fn transformers_key(name: &str) -> String {
    if name.starts_with("text_projection") {
        name.to_string()
    } else {
        format!("text_model.{name}")
    }
}

impl ClipTextModel {
    /// Loads from tensors named as in [`transformers_key`] without the
    /// `text_model.` (a rename adds it for files that have it).
    pub fn load(config: &ClipTextConfig, loader: &mut Loader<'_>, with_projection: bool) -> Self {
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let quick_gelu = config.hidden_act == super::config::ClipActivation::QuickGelu;
        // Adapters are named by transformers' module path whatever the file
        // calls it (kohya: `lora_te_text_model_encoder_layers_0_self_attn_q_proj`).
        let adaptable = |loader: &mut Loader<'_>, name: &str, d_in: usize, d_out: usize| {
            let path = transformers_key(&loader.key(name));
            LoraLinear::new(loader.linear(name, d_in, d_out, true), path)
        };
        let embeddings = {
            let mut loader = loader.pp("embeddings");
            ClipTextEmbeddings {
                token_embedding: loader.embedding("token_embedding", config.vocab_size, d),
                position_embedding: loader.embedding("position_embedding", config.max_position_embeddings, d),
            }
        };
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let mut all = loader.pp("encoder.layers");
            let mut layer = all.pp(i);
            let self_attn = {
                let mut attn = layer.pp("self_attn");
                ClipAttention {
                    q_proj: adaptable(&mut attn, "q_proj", d, d),
                    k_proj: adaptable(&mut attn, "k_proj", d, d),
                    v_proj: adaptable(&mut attn, "v_proj", d, d),
                    out_proj: adaptable(&mut attn, "out_proj", d, d),
                    heads: config.num_attention_heads,
                }
            };
            let layer_norm1 = layer.layer_norm("layer_norm1", d, eps);
            let mlp = {
                let mut mlp = layer.pp("mlp");
                ClipMlp {
                    fc1: adaptable(&mut mlp, "fc1", d, config.intermediate_size),
                    fc2: adaptable(&mut mlp, "fc2", config.intermediate_size, d),
                    quick_gelu,
                }
            };
            let layer_norm2 = layer.layer_norm("layer_norm2", d, eps);
            layers.push(ClipEncoderLayer { self_attn, layer_norm1, mlp, layer_norm2 });
        }
        Self {
            embeddings,
            encoder: ClipEncoder { layers },
            final_layer_norm: loader.layer_norm("final_layer_norm", d, eps),
            text_projection: with_projection.then(|| loader.linear("text_projection", d, config.projection_dim.unwrap_or(d), false)),
            eos_token_id: config.eos_token_id.unwrap_or(49407),
        }
    }

    /// Encodes token ids `[batch, 77]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> ClipOutput {
        let [batch, length] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..length as i64, &device).reshape([1, length]).repeat_dim(0, batch);
        let mut x = self.embeddings.token_embedding.forward(ids.clone()) + self.embeddings.position_embedding.forward(positions);
        // Causal: each token sees itself and the tokens before it.
        let mask = Tensor::<2, Bool>::tril_mask([length, length], 0, &device).reshape([1, 1, length, length]).repeat_dim(0, batch);
        let mut hidden_states = vec![x.clone()];
        for layer in &self.encoder.layers {
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
        for layer in &mut self.encoder.layers {
            let (attention, mlp) = (&mut layer.self_attn, &mut layer.mlp);
            all.extend([&mut attention.q_proj, &mut attention.k_proj, &mut attention.v_proj, &mut attention.out_proj, &mut mlp.fc1, &mut mlp.fc2]);
        }
        all
    }

    /// The layers that carry an adapter now, in module order.
    pub fn adapted_layers(&self) -> Vec<&LoraLinear> {
        let mut all = Vec::new();
        for layer in &self.encoder.layers {
            let (attention, mlp) = (&layer.self_attn, &layer.mlp);
            all.extend([&attention.q_proj, &attention.k_proj, &attention.v_proj, &attention.out_proj, &mlp.fc1, &mlp.fc2]);
        }
        all.retain(|l| l.is_adapted());
        all
    }

    /// A copy without adapters (the base encoder); tensors are shared, not copied.
    pub fn without_lora(&self) -> Self {
        let mut copy = self.clone();
        for layer in copy.lora_layers_mut() {
            layer.detach_adapter();
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
