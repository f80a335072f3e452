//! What the rest of Tartarus needs from the microVM monitor without linking it: the
//! control API's messages (`api`) and a blocking client (`client`), the machine
//! configuration (`config`, with the `cmdline` and `layout` limits it is checked
//! against), the snapshot file reader and `inspect` (`snapshot`), and the KVM flavour
//! probe the doctor runs (`probe`). `tartarus-vmm` builds on these types; `rust/core`
//! and `rust/host` use only this crate.

pub mod api;
pub mod client;
pub mod cmdline;
pub mod config;
pub mod layout;
pub mod probe;
pub mod snapshot;
