//! Sharding a margins job: shard `i/n` owns whole contiguous chunks of the window, so shards
//! give the same rows as one run and [`super::merge`] can join them.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("shard {s:?}: expected i/n, e.g. 0/4"))?;
        let index: usize = i
            .trim()
            .parse()
            .with_context(|| format!("shard {s:?}: bad index"))?;
        let count: usize = n
            .trim()
            .parse()
            .with_context(|| format!("shard {s:?}: bad count"))?;
        Shard::new(index, count)
    }
}

impl Shard {
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            bail!("shard {index}/{count}: the index must be in 0..{count}");
        }
        Ok(Shard { index, count })
    }
}

/// Positions (in the window) of the chunks a shard owns: whole chunks, contiguous.
pub fn shard_chunks(n: usize, chunk: usize, shard: Option<Shard>) -> Vec<std::ops::Range<usize>> {
    let chunk = chunk.max(1);
    let all: Vec<_> = (0..n.div_ceil(chunk))
        .map(|c| c * chunk..((c + 1) * chunk).min(n))
        .collect();
    match shard {
        None => all,
        Some(s) => {
            let c = all.len();
            all[s.index * c / s.count..(s.index + 1) * c / s.count].to_vec()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_take_whole_contiguous_chunks_and_cover_everything_once() {
        let n = 23;
        let mut seen = vec![0; n];
        for i in 0..3 {
            for r in shard_chunks(n, 4, Some(Shard::new(i, 3).unwrap())) {
                assert!(r.start.is_multiple_of(4));
                r.for_each(|p| seen[p] += 1);
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
        assert!("3/3".parse::<Shard>().is_err());
        assert_eq!(
            "1/3".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 3 }
        );
        let e = "1-3".parse::<Shard>().unwrap_err().to_string();
        assert!(e.contains("expected i/n") && !e.contains("--"), "{e}");
    }
}
