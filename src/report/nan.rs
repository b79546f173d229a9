//! `metrics.json` and NaN: serde_json writes a non-finite float (an undefined statistic, e.g.
//! AUROC without positives) as `null`, so reading the report back turns `null` into NaN.

use serde::{Deserialize, Deserializer};

/// A number, or a fixed list of numbers, where `null` stands for NaN.
pub trait NullIsNan: Sized {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
}

fn nan(v: Option<f64>) -> f64 {
    v.unwrap_or(f64::NAN)
}

impl NullIsNan for f64 {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<f64>::deserialize(d).map(nan)
    }
}

impl NullIsNan for [f64; 2] {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <[Option<f64>; 2]>::deserialize(d).map(|v| v.map(nan))
    }
}

impl NullIsNan for Vec<f64> {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Option<f64>>::deserialize(d).map(|v| v.into_iter().map(nan).collect())
    }
}

/// `#[serde(deserialize_with = "null_is_nan")]`.
pub fn null_is_nan<'de, D: Deserializer<'de>, T: NullIsNan>(d: D) -> Result<T, D::Error> {
    T::read(d)
}
