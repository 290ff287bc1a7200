//! Stable Diffusion's components: tokenizer, CLIP text encoder, VAE, UNet.

pub mod safetensors_file;
pub mod tokenizer;
