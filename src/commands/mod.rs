//! Requests from the buses: parsing, dispatch, responses.

pub mod inbox;
pub mod plane;
pub mod policy;
pub mod reply;
pub mod request;
pub mod response;
