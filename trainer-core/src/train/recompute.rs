//! Gradient checkpointing by stage, as diffusers' `enable_gradient_checkpointing`
//! does it: the UNet's forward runs once without autodiff, keeping only
//! each stage's input (a resnet, a transformer, a resampler; see
//! [`UNet2DConditionModel::stages`]); the backward pass then walks the
//! stages in reverse, running one stage again with autodiff and
//! back-propagating into it the gradient of its output. Memory holds the
//! stage inputs and one stage's graph instead of the whole UNet's, for
//! one extra forward pass.
//!
//! Every backward hands its gradients to `collect` (the optimizer sums
//! them), so a parameter used by several stages gets the sum, as one
//! backward over the whole graph would give. The time embedding and the
//! text context feed every stage: their gradients are summed over the
//! stages and back-propagated last, into the time embedding and (when it
//! trains) the text encoder.

use burn::module::Module;
use burn::tensor::{Device, Gradients, Tensor};

use super::optimizer::frozen_on;
use crate::models::unet::{AddedConditions, UNet2DConditionModel};

/// A stage input on the training device, as a leaf that keeps its gradient
/// when `needs_grad`.
fn leaf<const D: usize>(plain: &Tensor<D>, needs_grad: bool, train_device: &Device) -> Tensor<D> {
    let tensor = frozen_on(plain.clone(), train_device);
    if needs_grad {
        tensor.require_grad()
    } else {
        tensor
    }
}

/// Adds `term` (when there is one) to `sum`.
fn add_to<const D: usize>(sum: &mut Option<Tensor<D>>, term: Option<Tensor<D>>) {
    if let Some(term) = term {
        *sum = Some(match sum.take() {
            Some(total) => total + term,
            None => term,
        });
    }
}

/// Runs `unet` (the training module) on one batch and back-propagates
/// `loss_of(prediction)` stage by stage, handing each backward's gradients
/// to `collect`. Returns the loss (without autodiff). The gradients
/// `collect` sees sum to those of `loss_of(unet.forward_with(...)).backward()`.
#[allow(clippy::too_many_arguments)]
pub fn backward_in_stages(
    unet: &UNet2DConditionModel,
    sample: Tensor<4>,
    timesteps: &[f32],
    context: Tensor<3>,
    added: Option<&AddedConditions>,
    train_device: &Device,
    loss_of: &dyn Fn(Tensor<4>) -> Tensor<1>,
    collect: &mut dyn FnMut(&mut Gradients),
) -> Tensor<1> {
    // The time embedding keeps its graph (small: [batch, 4 × channels])
    // for the last backward; the stages see it as a leaf.
    let temb = unet.time_embedding_of(timesteps, added, &sample.device());
    let (temb_trains, context_trains) = (temb.is_tracked(), context.is_tracked());
    let temb_plain = temb.clone().without_autodiff();
    let context_plain = context.clone().without_autodiff();

    // First pass, without autodiff: keep each stage's input and the skips.
    let steps = unet.stages();
    let plain = unet.valid();
    let mut inputs: Vec<Tensor<4>> = Vec::with_capacity(steps.len());
    // Per stage, the index in `skips` of the skip it takes; `open_skips`
    // is the stack of skips not taken yet.
    let mut taken_skip: Vec<Option<usize>> = Vec::with_capacity(steps.len());
    let mut skips: Vec<Tensor<4>> = Vec::new();
    let mut open_skips: Vec<usize> = Vec::new();
    let mut x = sample.without_autodiff();
    for step in &steps {
        inputs.push(x.clone());
        let taken = step.takes_skip.then(|| open_skips.pop().expect("one skip per up-block resnet"));
        taken_skip.push(taken);
        x = plain.run_stage(step.stage, x, taken.map(|i| skips[i].clone()), &temb_plain, &context_plain);
        if step.keeps_skip {
            open_skips.push(skips.len());
            skips.push(x.clone());
        }
    }
    drop(x);

    // Backward, last stage first.
    let mut skip_grads: Vec<Option<Tensor<4>>> = vec![None; skips.len()];
    let mut kept_skip = skips.len();
    let mut output_grad: Option<Tensor<4>> = None;
    let (mut temb_grad, mut context_grad): (Option<Tensor<2>>, Option<Tensor<3>>) = (None, None);
    let mut loss = None;
    for (k, step) in steps.iter().enumerate().rev() {
        // The gradient of this stage's output: from the next stage, plus the
        // up-block resnet that took it as a skip.
        let mut grad_out = output_grad.take();
        if step.keeps_skip {
            kept_skip -= 1;
            add_to(&mut grad_out, skip_grads[kept_skip].take());
        }
        // conv_in's input is the noisy sample: no gradient needed.
        let x = leaf(&inputs[k], k > 0, train_device);
        let skip = taken_skip[k].map(|i| leaf(&skips[i], true, train_device));
        let temb_leaf = leaf(&temb_plain, temb_trains, train_device);
        let context_leaf = leaf(&context_plain, context_trains, train_device);
        let out = unet.run_stage(step.stage, x.clone(), skip.clone(), &temb_leaf, &context_leaf);
        let objective = if k + 1 == steps.len() {
            let value = loss_of(out);
            loss = Some(value.clone().without_autodiff());
            value
        } else {
            match grad_out {
                Some(grad) => (out * frozen_on(grad, train_device)).sum(),
                // Nothing after this stage depends on a trained weight.
                None => continue,
            }
        };
        if !objective.is_tracked() {
            continue;
        }
        let mut grads = objective.backward();
        output_grad = x.grad_remove(&mut grads);
        if let (Some(skip), Some(i)) = (&skip, taken_skip[k]) {
            skip_grads[i] = skip.grad_remove(&mut grads);
        }
        add_to(&mut temb_grad, temb_leaf.grad_remove(&mut grads));
        add_to(&mut context_grad, context_leaf.grad_remove(&mut grads));
        collect(&mut grads);
        inputs.truncate(k);
    }

    // Last, through the time embedding and the text context.
    let mut objective: Option<Tensor<1>> = None;
    if let (true, Some(grad)) = (temb_trains, temb_grad) {
        add_to(&mut objective, Some((temb * frozen_on(grad, train_device)).sum()));
    }
    if let (true, Some(grad)) = (context_trains, context_grad) {
        add_to(&mut objective, Some((context * frozen_on(grad, train_device)).sum()));
    }
    if let Some(objective) = objective {
        collect(&mut objective.backward());
    }
    loss.expect("the output stage runs")
}
