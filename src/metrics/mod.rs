//! Margin-consistency and detection metrics.
