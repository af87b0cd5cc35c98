//! The Cog contract as runner understands it, with no model code and no I/O beyond reading
//! the model directory: `cog.yaml` ([`config`]), the model directory and its weights layout
//! ([`model_dir`]), Input/Output signatures ([`signature`]), the OpenAPI document Cog's
//! generator would write for them ([`openapi`]) and input validation against it ([`input`]),
//! and which GPUs a CUDA build runs on ([`cuda_arch`]).

pub mod config;
pub mod cuda_arch;
pub mod input;
pub mod model_dir;
pub mod openapi;
pub mod signature;

pub use config::{CogConfig, ConfigError, RunTarget};
pub use input::{InputValidator, ValidationIssue};
pub use model_dir::{ModelDir, ModelDirError, WeightsLayout};
pub use openapi::Mode;
pub use signature::{FieldType, InputField, OutputType, Primitive, Signature};

/// The Cog version whose contract runner reproduces (schema `info.version`, `cog_version`).
pub const COG_VERSION: &str = "0.23.1";
