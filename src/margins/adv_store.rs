//! The adversarial examples of a margins job (`.npy`, `[N, C, H, W]` float32, NaN images where
//! no example was found), kept across interruptions like the rows.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use npyz::WriterBuilder;
use tch::{Kind, Tensor};

/// Adversarial examples kept across interruptions: `<adv>.part` holds `(index u64, pixels f32)`
/// records appended per chunk; [`AdvStore::finish`] writes the `.npy` in dataset order (NaN
/// images for samples without an adversarial example), through a temporary file so that the
/// `.npy` is either complete or absent.
pub struct AdvStore {
    part: PathBuf,
    file: std::fs::File,
    have: BTreeMap<usize, u64>,
    pixels: usize,
    shape: [i64; 3],
}

impl AdvStore {
    /// Opens (`fresh`: starts) the store of `path`.
    pub fn open(path: &Path, shape: [i64; 3], fresh: bool) -> Result<Self> {
        let mut part = path.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let pixels = shape.iter().product::<i64>() as usize;
        let record = 8 + 4 * pixels;
        let mut have = BTreeMap::new();
        if fresh && part.exists() {
            std::fs::remove_file(&part).with_context(|| format!("removing {}", part.display()))?;
        }
        if part.exists() {
            let mut bytes = Vec::new();
            std::fs::File::open(&part)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .with_context(|| format!("reading {}", part.display()))?;
            let whole = bytes.len() / record;
            for r in 0..whole {
                let mut idx = [0u8; 8];
                idx.copy_from_slice(&bytes[r * record..r * record + 8]);
                have.entry(u64::from_le_bytes(idx) as usize)
                    .or_insert((r * record) as u64);
            }
            // Drop a record cut by a kill.
            let f = std::fs::OpenOptions::new().write(true).open(&part)?;
            f.set_len((whole * record) as u64)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .with_context(|| format!("opening {}", part.display()))?;
        Ok(AdvStore {
            part,
            file,
            have,
            pixels,
            shape,
        })
    }

    pub fn has(&self, index: usize) -> bool {
        self.have.contains_key(&index)
    }

    pub fn append(&mut self, indices: &[usize], adv: &Tensor, success: &[bool]) -> Result<()> {
        let flat = Vec::<f32>::try_from(
            adv.to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
                .flatten(0, -1),
        )?;
        let mut buf = Vec::new();
        let mut offset = self.file.metadata()?.len();
        for (k, &i) in indices.iter().enumerate() {
            if self.have.contains_key(&i) {
                continue;
            }
            buf.extend_from_slice(&(i as u64).to_le_bytes());
            for &v in &flat[k * self.pixels..(k + 1) * self.pixels] {
                buf.extend_from_slice(&(if success[k] { v } else { f32::NAN }).to_le_bytes());
            }
            self.have.insert(i, offset);
            offset += (8 + 4 * self.pixels) as u64;
        }
        self.file.write_all(&buf)?;
        self.file.flush()?;
        Ok(())
    }

    pub fn finish(self, path: &Path, indices: &[usize]) -> Result<()> {
        let bytes = std::fs::read(&self.part)
            .with_context(|| format!("reading {}", self.part.display()))?;
        let mut offsets = Vec::with_capacity(indices.len());
        for i in indices {
            let at = *self.have.get(i).with_context(|| {
                format!(
                    "{}: no adversarial example stored for sample {i}",
                    self.part.display()
                )
            })? as usize;
            offsets.push(at + 8);
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> Result<()> {
            let shape = [
                indices.len() as u64,
                self.shape[0] as u64,
                self.shape[1] as u64,
                self.shape[2] as u64,
            ];
            let out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            let mut npy = npyz::WriteOptions::<f32>::new()
                .default_dtype()
                .shape(&shape)
                .writer(out)
                .begin_nd()?;
            for at in offsets {
                npy.extend(
                    bytes[at..at + 4 * self.pixels]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                )?;
            }
            npy.finish()?;
            Ok(())
        };
        write().with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        std::fs::remove_file(&self.part)
            .with_context(|| format!("removing {}", self.part.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `.npy` holds the stored examples in the order asked, NaN where the attack failed,
    /// under the `[N, C, H, W]` shape, and reads back with npyz.
    #[test]
    fn finish_writes_the_examples_in_dataset_order_as_npy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adv.npy");
        let shape = [1, 2, 3];
        let x = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([2, 1, 2, 3]) / 16.0;
        let mut store = AdvStore::open(&path, shape, true).unwrap();
        store.append(&[5, 4], &x, &[true, false]).unwrap();
        drop(store);
        // A resumed store keeps what was appended and adds the rest.
        let mut store = AdvStore::open(&path, shape, false).unwrap();
        assert!(store.has(5) && store.has(4) && !store.has(6));
        store
            .append(&[6], &(x.narrow(0, 0, 1) + 0.5), &[true])
            .unwrap();
        store.finish(&path, &[4, 5, 6]).unwrap();
        assert!(!dir.path().join("adv.npy.part").exists());

        let npy = npyz::NpyFile::new(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(npy.shape(), &[3, 1, 2, 3]);
        let v: Vec<f32> = npy.into_vec().unwrap();
        assert!(v[..6].iter().all(|p| p.is_nan()), "sample 4 failed: NaN");
        let first: Vec<f32> = (0..6).map(|k| k as f32 / 16.0).collect();
        assert_eq!(&v[6..12], first.as_slice());
        let again: Vec<f32> = first.iter().map(|p| p + 0.5).collect();
        assert_eq!(&v[12..], again.as_slice());
    }
}
