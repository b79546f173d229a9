//! Minimum-norm attacks that estimate each sample's input margin d_in(x).

pub mod table;
