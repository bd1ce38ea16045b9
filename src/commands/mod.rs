//! Requests from the buses: parsing, dispatch, responses.

pub mod request;
pub mod response;
