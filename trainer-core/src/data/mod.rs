//! The image pipeline: from files to sized, captioned, batched samples.

pub mod batch_sampler;
pub mod captions;
pub mod geometry;
pub mod preprocess;
pub mod probe;
pub mod source;
