//! The C ABI of anyvm (`libanyvm`). Opaque handles, explicit `_delete` functions, an error object
//! returned by every fallible call, no panic across the boundary, NULL and bad UTF-8 reported as
//! errors, and a registry of live handles so use-after-delete is an error instead of a crash.
//! The header `include/anyvm.h` is generated from this file by cbindgen.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

mod call;
mod client;
mod doctor;
mod error;
mod events;
mod exec;
mod handles;
mod job;
mod vm;

pub use client::*;
pub use doctor::*;
pub use error::*;
pub use events::*;
pub use exec::*;
pub use job::*;
pub use vm::*;

pub(crate) use call::*;
