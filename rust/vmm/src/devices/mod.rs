//! Emulated devices attached to the microVM's buses.

pub mod virtio;
