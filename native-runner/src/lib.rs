//! The native runner's pieces, shared by its binaries and tests.

pub mod device;
pub mod folder;
pub mod plan_command;
pub mod sample_command;
pub mod tools_command;
pub mod train_command;
pub mod bench;
