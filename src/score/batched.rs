//! The batched loop every stage runs over a set of samples (scoring, detector fitting,
//! evaluation): consecutive batches of at most `batch_size`, progress counted in samples.

use std::ops::Range;

use anyhow::{ensure, Result};

use crate::util::{OptionError, Progress};

/// Calls `f` on `0..n` cut into consecutive ranges of at most `batch_size` samples, in order,
/// reporting each range's samples to `progress` once `f` has run on it. The first error stops.
pub fn for_each_batch(
    n: usize,
    batch_size: usize,
    progress: &dyn Progress,
    mut f: impl FnMut(Range<usize>) -> Result<()>,
) -> Result<()> {
    ensure!(
        batch_size > 0,
        OptionError::new("batch_size", "the batch size must be positive")
    );
    for start in (0..n).step_by(batch_size) {
        let end = (start + batch_size).min(n);
        f(start..end)?;
        progress.inc((end - start) as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;

    struct Count(Cell<u64>);
    impl Progress for Count {
        fn set_length(&self, _: u64) {}
        fn inc(&self, units: u64) {
            self.0.set(self.0.get() + units);
        }
    }

    #[test]
    fn covers_every_sample_once_in_order() {
        let seen = RefCell::new(Vec::new());
        let p = Count(Cell::new(0));
        for_each_batch(10, 4, &p, |r| {
            seen.borrow_mut().push(r);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.into_inner(), [0..4, 4..8, 8..10]);
        assert_eq!(p.0.get(), 10);
        let err = for_each_batch(3, 0, &p, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("batch size"), "{err}");
    }
}
