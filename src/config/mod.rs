//! Pipeline configuration: one TOML file per benchmark (`pipelines/*.toml`).
//!
//! - `schema.rs`: the typed config, one struct per table, and its defaults;
//! - `choices.rs`: every closed choice as an enum (one spelling in TOML, flags and messages);
//! - `load.rs`: the file, `--set` overrides, serde;
//! - `vars.rs`: `${VAR}` and `${VAR:-default}` in path values;
//! - `validate.rs`: every value checked, every problem reported at once as
//!   `key = value: expected ...`;
//! - `diff.rs`: the changes since a recorded config, and those a resumed run may make;
//! - `device.rs`: `run.device` and what libtorch has of it.

mod choices;
mod device;
mod diff;
mod load;
mod schema;
mod validate;
mod vars;

pub use choices::*;
pub use device::{parse_device, DeviceChoice};
pub use diff::{listed, recorded_changes, ConfigChange};
pub use load::ConfigErrors;
pub use schema::*;
