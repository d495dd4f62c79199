//! hearth's wire types: the Gateway resources as they travel in JSON, google.rpc codes and
//! statuses, resource names and protobuf durations, and the AIP-160 query language.
//!
//! Nothing here does IO. Every type is the exact JSON shape the official clients send and
//! expect (camelCase keys, enums as their proto names, int64 as strings); unknown fields and
//! unknown enum values fail to deserialize, so the layers above never see them.

pub mod deepinfra;
pub mod duration;
pub mod names;
pub mod openai;
pub mod query;
pub mod replica;
pub mod resources;
pub mod rpc;

pub use rpc::{Code, Status};
