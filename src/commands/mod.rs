//! Requests from the buses: parsing, dispatch, responses.
