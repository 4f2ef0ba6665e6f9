//! corecast gateway.
#![forbid(unsafe_code)]
pub mod ws;
