//! Detectors fitted on attacked samples: threshold on a score, pseudo-margin MLP.
