//! One name for each weight. Model structs name their fields like the
//! diffusers/transformers keys they load (`down_blocks.0.attentions.1`,
//! `mid_block.resnets.0`, `encoder.layers.3.self_attn.q_proj`), so a
//! parameter's burn module path *is* its checkpoint key, up to the few
//! names Rust or burn cannot spell, listed in [`FIELD_NAMES`]:
//!
//! - burn's norms call their scale and shift `gamma` and `beta`;
//! - a key segment that is a number after a name (`to_out.0`, `ff.net.0`)
//!   is a field `to_out_0`, `net_0`;
//! - wrappers that add no key segment: `LoraLinear`'s `base` (the frozen
//!   layer) and enum variants (`proj_in` is a `Conv` or a `Linear`), which
//!   burn puts in the path with a capital letter.
//!
//! Run checkpoints, optimizer state, LoRA layer names and full exports all
//! take names from here; `tests/model_keys.rs` checks that for every
//! fixture model each parameter's derived name is the key it was loaded from.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// burn field names that stand for another key segment.
pub const FIELD_NAMES: [(&str, &str); 5] = [("gamma", "weight"), ("beta", "bias"), ("to_out_0", "to_out.0"), ("net_0", "net.0"), ("net_2", "net.2")];

/// The wrapper field of [`super::lora::LoraLinear`] that holds the base layer.
const BASE_LAYER: &str = "base";

/// A module path being walked by a burn visitor or mapper: push a field at
/// `enter_module`, pop it at `exit_module`, read the key of a parameter
/// inside it ([`visit_keyed`] and [`map_keyed`] do this for you).
#[derive(Debug, Clone, Default)]
pub struct ModulePath {
    /// Put before every key (`text_encoder.` for a text encoder's tensors in
    /// checkpoints and optimizer state).
    prefix: String,
    fields: Vec<String>,
}

impl ModulePath {
    /// A walk whose keys start with `prefix`.
    pub fn under(prefix: &str) -> Self {
        Self { prefix: prefix.to_string(), fields: Vec::new() }
    }

    pub fn enter(&mut self, field: &str) {
        self.fields.push(field.to_string());
    }

    pub fn exit(&mut self) {
        self.fields.pop();
    }

    /// The checkpoint key of where the walk is now.
    pub fn key(&self) -> String {
        format!("{}{}", self.prefix, key_of(self.fields.iter().map(String::as_str)))
    }
}

/// A walk over a module's float parameters that is told each one's key.
pub trait KeyedVisitor {
    fn visit<const D: usize>(&mut self, key: &str, param: &Param<Tensor<D>>);
}

/// A map over a module's float parameters that is told each one's key.
pub trait KeyedMapper {
    fn map<const D: usize>(&mut self, key: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>>;
}

/// Visits `module`'s float parameters with their keys, each after `prefix`.
pub fn visit_keyed<M: Module>(module: &M, prefix: &str, visitor: &mut impl KeyedVisitor) {
    module.visit(&mut Walk { path: ModulePath::under(prefix), inner: visitor });
}

/// Maps `module`'s float parameters with their keys, each after `prefix`.
pub fn map_keyed<M: Module>(module: M, prefix: &str, mapper: &mut impl KeyedMapper) -> M {
    module.map(&mut Walk { path: ModulePath::under(prefix), inner: mapper })
}

/// Tracks the module path for a [`KeyedVisitor`] or [`KeyedMapper`].
struct Walk<'a, T> {
    path: ModulePath,
    inner: &'a mut T,
}

impl<T: KeyedVisitor> ModuleVisitor for Walk<'_, T> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.inner.visit(&self.path.key(), param);
    }
}

impl<T: KeyedMapper> ModuleMapper for Walk<'_, T> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        self.inner.map(&self.path.key(), param)
    }
}

/// The checkpoint key of a burn module path given field by field.
pub fn key_of<'a>(fields: impl IntoIterator<Item = &'a str>) -> String {
    let segments =
        fields.into_iter().filter(|field| !is_wrapper(field)).map(|field| FIELD_NAMES.iter().find(|(rust, _)| *rust == field).map_or(field, |(_, key)| key));
    segments.collect::<Vec<_>>().join(".")
}

fn is_wrapper(field: &str) -> bool {
    field == BASE_LAYER || field.starts_with(|c: char| c.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_field_paths_become_checkpoint_keys() {
        assert_eq!(key_of(["mid_block", "attentions", "0", "proj_in", "Conv", "weight"]), "mid_block.attentions.0.proj_in.weight");
        assert_eq!(key_of(["transformer_blocks", "0", "ff", "net_0", "proj", "base", "weight"]), "transformer_blocks.0.ff.net.0.proj.weight");
        assert_eq!(key_of(["attn1", "to_out_0", "lora", "down"]), "attn1.to_out.0.lora.down");
        assert_eq!(key_of(["conv_norm_out", "gamma"]), "conv_norm_out.weight");
        assert_eq!(key_of(["time_embedding", "linear_1", "bias"]), "time_embedding.linear_1.bias");
    }
}
