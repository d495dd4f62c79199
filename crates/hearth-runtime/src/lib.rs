//! hearth's runtime: what makes deployments real. The [`controller`] runs a [`reconcile`] per
//! deployment that reads its spec through the control plane, drives a [`Runtime`] (the local
//! backend runs `hearth engine` child processes, the [`kubernetes`] one pods), loads addons onto replicas through the typed
//! replica protocol ([`replica`]), and writes what it observed into the deployment's status.
//! It publishes each deployment's ready endpoints to the [`fleet`], which the gateway's
//! inference router reads, and scales deployments from the load it sees ([`autoscale`]).
//!
//! The runtime writes status rows only; specs belong to the API (`hearth_control::observe`).

pub mod autoscale;
pub mod controller;
pub mod credentials;
pub mod election;
pub mod error;
pub mod fleet;
pub mod kubernetes;
pub mod local;
pub mod reconcile;
pub mod replica;
pub mod runtime;

pub use controller::Controller;
pub use credentials::ReplicaCredentials;
pub use error::{Result, RuntimeError};
pub use fleet::Fleet;
pub use reconcile::{reconcile, Action, Context};
pub use replica::{HttpReplicas, ReplicaApi};
pub use runtime::{Clock, Phase, Replica, ReplicaFiles, ReplicaSpec, Runtime, SystemClock};
