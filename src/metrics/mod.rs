//! Margin-consistency and detection metrics, pure Rust on `f64` slices.
//!
//! [`rank`]: how well the logit margin orders samples like the input margin (Kendall τ-b,
//! Spearman, Pearson). [`detection`]: how well a score separates non-robust samples
//! (`d_in <= eps`) from robust ones (AUROC, AUPR, AP, FPR@95TPR). [`bootstrap`]: seeded
//! confidence intervals. [`robust`]: robust accuracy and its estimate from a few attacks.

pub mod bootstrap;
pub mod detection;
pub mod rank;
pub mod robust;
