//! Margin-consistency and detection metrics, pure Rust on `f64` slices.
//!
//! [`correlation`]: how well the logit margin orders samples like the input margin (Kendall
//! τ-b, Spearman, Pearson). [`roc`]: how well a score separates non-robust samples
//! (`d_in <= eps`) from robust ones (ROC and precision-recall curves, AUROC, AUPR, AP,
//! FPR@95TPR). [`bootstrap`]: seeded confidence intervals. [`robust`]: robust accuracy and its
//! estimate from a few attacks.

pub mod bootstrap;
pub mod correlation;
pub mod robust;
pub mod roc;
