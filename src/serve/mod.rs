//! The HTTP scoring service.
