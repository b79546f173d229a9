//! The analysis report: metrics.json, HTML and figures.
