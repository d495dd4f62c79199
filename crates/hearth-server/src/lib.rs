//! hearth's HTTP layer: the gateway app (the Gateway control API, signed uploads, health,
//! metrics and the OpenAPI document). Handlers only translate between HTTP and the control
//! plane's services; this crate is the one place where errors become HTTP responses.

pub mod engine_app;
pub mod error;
pub mod gateway;
pub mod metrics;
pub mod openapi;
mod params;
pub mod recent;
mod structured;

pub use engine_app::{engine_router, SamplingDefaults, ServerOptions};
pub use error::ApiError;
pub use gateway::{router as gateway_router, router_with as gateway_router_with, serve_direct_routes, Inference};
