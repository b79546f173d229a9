//! Per-sample rows: whatever the driver or an attack keeps per active sample (tensors whose dim 0
//! indexes samples, plain vectors of counters) can keep a subset of its rows ([`Rows::select_rows`])
//! and take new rows after its own ([`Rows::append_rows`]). The driver admits and retires samples with
//! these two operations alone; [`rows!`](crate::rows) derives them for a struct field by field.

use tch::{Device, Tensor};

/// Which rows to keep, in order: as indices and as an int64 tensor on the batch's device.
pub struct Pick {
    pub rows: Vec<usize>,
    pub index: Tensor,
}

impl Pick {
    pub fn new(rows: Vec<usize>, device: Device) -> Self {
        let index = Tensor::from_slice(&rows.iter().map(|&p| p as i64).collect::<Vec<_>>())
            .to_device(device);
        Pick { rows, index }
    }
}

/// Per-sample state that can be subset and extended row-wise.
pub trait Rows: Sized {
    /// The rows in `pick`, in its order.
    fn select_rows(&self, pick: &Pick) -> Self;
    /// `self`'s rows followed by `other`'s.
    fn append_rows(self, other: Self) -> Self;
}

impl Rows for Tensor {
    fn select_rows(&self, pick: &Pick) -> Self {
        self.index_select(0, &pick.index)
    }

    fn append_rows(self, other: Self) -> Self {
        Tensor::cat(&[self, other], 0)
    }
}

impl<T: Clone> Rows for Vec<T> {
    fn select_rows(&self, pick: &Pick) -> Self {
        pick.rows.iter().map(|&i| self[i].clone()).collect()
    }

    fn append_rows(mut self, other: Self) -> Self {
        self.extend(other);
        self
    }
}

/// Implements [`Rows`] for a struct whose every listed field is [`Rows`]:
/// `rows!(FmnState { delta, eps, found });`.
#[macro_export]
macro_rules! rows {
    ($ty:ident { $($field:ident),+ $(,)? }) => {
        impl $crate::attack::rows::Rows for $ty {
            fn select_rows(&self, pick: &$crate::attack::rows::Pick) -> Self {
                $ty { $($field: $crate::attack::rows::Rows::select_rows(&self.$field, pick)),+ }
            }

            fn append_rows(self, other: Self) -> Self {
                $ty { $($field: $crate::attack::rows::Rows::append_rows(self.$field, other.$field)),+ }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Two {
        t: Tensor,
        v: Vec<u64>,
    }
    crate::rows!(Two { t, v });

    #[test]
    fn select_then_append_keeps_rows_aligned() {
        let a = Two {
            t: Tensor::from_slice(&[10i64, 11, 12, 13]).view([2, 2]),
            v: vec![1, 2],
        };
        let b = Two {
            t: Tensor::from_slice(&[20i64, 21]).view([1, 2]),
            v: vec![3],
        };
        let both = a
            .append_rows(b)
            .select_rows(&Pick::new(vec![2, 0], Device::Cpu));
        assert_eq!(
            Vec::<i64>::try_from(both.t.flatten(0, -1)).unwrap(),
            vec![20, 21, 10, 11]
        );
        assert_eq!(both.v, vec![3, 1]);
    }
}
