//! Requests from the buses: parsing, dispatch, responses.

pub mod plane;
pub mod request;
pub mod response;
