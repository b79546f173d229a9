//! brittle: detects brittle decisions of robust image classifiers.
//!
//! Life cycle: estimate input margins offline ([`attack`]), analyse margin consistency and
//! detection ([`metrics`], [`report`]), fit a detector ([`detector`]), score live inputs
//! ([`score`], [`serve`]). Every stage sees models through [`model::Classifier`].

pub mod attack;
pub mod certify;
pub mod cli;
pub mod data;
pub mod detector;
pub mod margins;
pub mod metrics;
pub mod model;
pub mod norm;
pub mod provenance;
pub mod report;
pub mod score;
pub mod serve;
pub mod train;
pub mod util;
