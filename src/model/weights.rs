//! Reading named weight tensors from PyTorch checkpoints and safetensors files, and copying them
//! into a tch `VarStore` whose variable names are the PyTorch `state_dict` names.
//!
//! Formats: safetensors; `torch.save` zip archives (PyTorch >= 1.6); the legacy (pre-1.6)
//! stream of pickles followed by raw storages. Pickles are parsed with `repugnant-pickle`;
//! the PyTorch conventions on top of it (persistent storage ids, `_rebuild_tensor_v2`,
//! `OrderedDict`, checkpoint nesting) are interpreted here because no light crate does so
//! for both the zip and the legacy layout.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use repugnant_pickle::ops::PickleOp;
use repugnant_pickle::{evaluate, parsers::parse_op, SequenceType, Value};
use tch::{nn::VarStore, Kind, Tensor};

/// Keys under which training scripts nest the `state_dict` in a checkpoint dictionary.
const NESTING_KEYS: &[&str] = &["state_dict", "model_state_dict", "model", "net", "state"];

/// Prefixes that wrappers (`nn.DataParallel`, a normalising wrapper) add to every name.
const WRAPPER_PREFIXES: &[&str] = &["module.", "model."];

/// Reads every named tensor of a weights file (the innermost `state_dict` of a checkpoint).
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let tensors = if bytes.starts_with(b"PK\x03\x04") {
        read_torch_zip(path)
    } else if is_safetensors(&bytes) {
        Tensor::read_safetensors(path).map_err(anyhow::Error::from)
    } else if bytes.first() == Some(&0x80) {
        read_torch_legacy(&bytes)
    } else {
        Err(anyhow!(
            "not a PyTorch checkpoint (zip or legacy pickle) nor a safetensors file"
        ))
    };
    let tensors = tensors.with_context(|| format!("reading weights {}", path.display()))?;
    ensure!(
        !tensors.is_empty(),
        "{}: no tensors found in the weights file",
        path.display()
    );
    Ok(tensors)
}

/// A safetensors file starts with an 8-byte header length followed by a JSON object.
fn is_safetensors(bytes: &[u8]) -> bool {
    bytes.len() > 8 && bytes[8] == b'{'
}

/// `torch.save` zip archive: `<root>/data.pkl` plus one `<root>/data/<key>` entry per storage.
fn read_torch_zip(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path)?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))?;
    let pkl = zip
        .file_names()
        .find(|n| n.ends_with("data.pkl"))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("zip archive without data.pkl (not a torch.save file?)"))?;
    let root = pkl.strip_suffix("data.pkl").unwrap_or_default().to_owned();
    let read_entry = |zip: &mut zip::ZipArchive<_>, name: &str| -> Result<Vec<u8>> {
        let mut entry = zip
            .by_name(name)
            .with_context(|| format!("archive entry {name}"))?;
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut buf)?;
        Ok(buf)
    };
    let data = read_entry(&mut zip, &pkl)?;
    let (ops, _) = parse_pickle(&data)?;
    let refs = tensor_refs(&ops)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for r in &refs {
        if !storages.contains_key(&r.1.storage) {
            let bytes = read_entry(&mut zip, &format!("{root}data/{}", r.1.storage))?;
            storages.insert(r.1.storage.clone(), bytes);
        }
    }
    build_tensors(refs, &storages)
}

/// Legacy `torch.save`: pickles of the magic number, protocol version and system info, the
/// object pickle, the list of storage keys, then per storage an 8-byte element count and data.
fn read_torch_legacy(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let mut rest = bytes;
    for what in ["magic number", "protocol version", "system info"] {
        rest = parse_pickle(rest)
            .with_context(|| format!("legacy header ({what})"))?
            .1;
    }
    let (ops, after) = parse_pickle(rest).context("legacy object pickle")?;
    let refs = tensor_refs(&ops)?;
    let (key_ops, mut rest) = parse_pickle(after).context("legacy storage key list")?;
    let (vals, _) = evaluate(&key_ops, true)?;
    let keys: Vec<String> = match vals.last() {
        Some(Value::Seq(_, items)) => items.iter().filter_map(string).map(str::to_owned).collect(),
        _ => bail!("legacy storage key list is not a list"),
    };
    let kinds: HashMap<&str, Kind> = refs
        .iter()
        .map(|(_, r)| (r.storage.as_str(), r.kind))
        .collect();
    let mut storages = HashMap::new();
    for key in keys {
        ensure!(rest.len() >= 8, "storage {key}: file truncated");
        let numel = u64::from_le_bytes(rest[..8].try_into()?) as usize;
        let elem = kinds.get(key.as_str()).map_or(1, |k| k.elt_size_in_bytes());
        let len = numel
            .checked_mul(elem)
            .filter(|&l| l <= rest.len() - 8)
            .ok_or_else(|| anyhow!("storage {key}: file truncated ({numel} elements)"))?;
        storages.insert(key, rest[8..8 + len].to_vec());
        rest = &rest[8 + len..];
    }
    build_tensors(refs, &storages)
}

/// Parses one pickle (up to its STOP opcode); returns its ops and the bytes after it.
fn parse_pickle(bytes: &[u8]) -> Result<(Vec<PickleOp<'_>>, &[u8])> {
    let mut ops = Vec::new();
    let mut rest = bytes;
    loop {
        let (r, op) = parse_op::<()>(rest).map_err(|_| {
            anyhow!(
                "malformed or truncated pickle at byte {}",
                bytes.len() - rest.len()
            )
        })?;
        rest = r;
        let stop = op == PickleOp::STOP;
        ops.push(op);
        if stop {
            return Ok((ops, rest));
        }
    }
}

/// Where a tensor's data lives: a storage, its element kind, and the strided view.
#[derive(Debug, Clone)]
struct TensorRef {
    storage: String,
    kind: Kind,
    offset: i64,
    shape: Vec<i64>,
    stride: Vec<i64>,
}

/// A pickled value as far as weights are concerned.
enum Entry {
    Tensor(TensorRef),
    Dict(Vec<(String, Entry)>),
    Other,
}

/// The named tensors of the object pickle, from the innermost `state_dict`.
fn tensor_refs(ops: &[PickleOp<'_>]) -> Result<Vec<(String, TensorRef)>> {
    let (vals, _) = evaluate(ops, true)?;
    let top = vals.last().ok_or_else(|| anyhow!("empty object pickle"))?;
    let mut entry = interpret(top)?;
    // Descend through {'state_dict': ...}, {'model': ...} while the current level holds no tensor.
    loop {
        let Entry::Dict(items) = entry else {
            bail!("the checkpoint is not a dictionary of tensors (a pickled nn.Module? save its state_dict())");
        };
        if items.iter().any(|(_, e)| matches!(e, Entry::Tensor(_))) {
            return Ok(items
                .into_iter()
                .filter_map(|(k, e)| match e {
                    Entry::Tensor(t) => Some((k, t)),
                    _ => None,
                })
                .collect());
        }
        let keys: Vec<String> = items.iter().map(|(k, _)| k.clone()).collect();
        entry = items
            .into_iter()
            .find(|(k, e)| NESTING_KEYS.contains(&k.as_str()) && matches!(e, Entry::Dict(_)))
            .map(|(_, e)| e)
            .ok_or_else(|| {
                anyhow!("no tensors and no state_dict entry in the checkpoint (keys: {keys:?})")
            })?;
    }
}

fn string<'a>(v: &Value<'a>) -> Option<&'a str> {
    match v {
        Value::String(s) => Some(s),
        _ => None,
    }
}

fn int(v: &Value<'_>) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        other => bail!("expected an integer in a tensor record, got {other:?}"),
    }
}

fn ints(v: &Value<'_>) -> Result<Vec<i64>> {
    match v {
        Value::Seq(_, items) => items.iter().map(int).collect(),
        other => bail!("expected a tuple of integers in a tensor record, got {other:?}"),
    }
}

/// The `(module, name)` of a `GLOBAL` value.
fn global_name<'a>(v: &'a Value<'_>) -> Option<(&'a str, &'a str)> {
    match v {
        Value::Raw(op) => match op.as_ref() {
            PickleOp::GLOBAL(m, n) => Some((m, n)),
            _ => None,
        },
        _ => None,
    }
}

/// `(key, value)` pairs of a dictionary's items: 2-tuples with a string key, possibly grouped
/// in tuples (one per `SETITEMS` batch).
fn pairs(items: &[Value<'_>]) -> Result<Vec<(String, Entry)>> {
    let mut out = Vec::new();
    for it in items {
        if let Value::Seq(_, inner) = it {
            match inner.as_slice() {
                [Value::String(k), v] => out.push(((*k).to_owned(), interpret(v)?)),
                _ => out.extend(pairs(inner)?),
            }
        }
    }
    Ok(out)
}

fn interpret(v: &Value<'_>) -> Result<Entry> {
    Ok(match v {
        Value::Seq(SequenceType::Dict, items) => Entry::Dict(pairs(items)?),
        Value::Build(inner, _) => interpret(inner)?,
        Value::Global(g, args) => match global_name(g) {
            Some(("collections", "OrderedDict")) => {
                let mut all = Vec::new();
                for a in args.iter().skip(1) {
                    if let Value::Seq(_, items) = a {
                        all.extend(pairs(items)?);
                    }
                }
                Entry::Dict(all)
            }
            Some(("torch._utils", "_rebuild_tensor_v2")) => Entry::Tensor(rebuild_tensor(args)?),
            Some(("torch._utils", "_rebuild_parameter")) => match args.first() {
                Some(Value::Seq(_, a)) if !a.is_empty() => interpret(&a[0])?,
                _ => Entry::Other,
            },
            _ => Entry::Other,
        },
        _ => Entry::Other,
    })
}

/// `_rebuild_tensor_v2((storage, offset, size, stride, requires_grad, hooks, ...))`.
fn rebuild_tensor(args: &[Value<'_>]) -> Result<TensorRef> {
    let a = match args.first() {
        Some(Value::Seq(_, a)) if a.len() >= 4 => a,
        _ => bail!("unexpected arguments to torch._utils._rebuild_tensor_v2"),
    };
    let pid = match &a[0] {
        Value::PersId(p) => match p.as_ref() {
            Value::Seq(_, p) if p.len() >= 5 => p,
            other => bail!("unexpected persistent id {other:?}"),
        },
        other => bail!("tensor without a storage reference: {other:?}"),
    };
    let storage_type = global_name(&pid[1])
        .map(|(_, n)| n)
        .ok_or_else(|| anyhow!("unexpected storage type {:?}", pid[1]))?;
    let kind = match storage_type {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        other => bail!("unsupported storage type {other}"),
    };
    let storage = string(&pid[2])
        .ok_or_else(|| anyhow!("unexpected storage key {:?}", pid[2]))?
        .to_owned();
    Ok(TensorRef {
        storage,
        kind,
        offset: int(&a[1])?,
        shape: ints(&a[2])?,
        stride: ints(&a[3])?,
    })
}

/// Makes each tensor from its storage bytes and strided view (copied, contiguous).
fn build_tensors(
    refs: Vec<(String, TensorRef)>,
    storages: &HashMap<String, Vec<u8>>,
) -> Result<Vec<(String, Tensor)>> {
    refs.into_iter()
        .map(|(name, r)| {
            let bytes = storages
                .get(&r.storage)
                .ok_or_else(|| anyhow!("{name}: storage {} is missing", r.storage))?;
            let elem = r.kind.elt_size_in_bytes();
            let numel = (bytes.len() / elem) as i64;
            // Largest element index the view touches must lie inside the storage.
            let extent = r.offset
                + r.shape
                    .iter()
                    .zip(&r.stride)
                    .map(|(s, st)| (s - 1).max(0) * st)
                    .sum::<i64>();
            ensure!(
                r.shape.iter().all(|&s| s >= 0)
                    && (r.shape.contains(&0) || (r.offset >= 0 && extent < numel)),
                "{name}: shape {:?} at offset {} does not fit its storage of {numel} elements (truncated file?)",
                r.shape,
                r.offset
            );
            let storage = Tensor::f_from_data_size(&bytes[..numel as usize * elem], &[numel], r.kind)?;
            let t = storage
                .f_as_strided(r.shape.as_slice(), r.stride.as_slice(), r.offset)?
                .contiguous();
            Ok((name, t))
        })
        .collect()
}

/// Copies `tensors` into the variables of `vs` by name, converting dtypes.
///
/// Wrapper prefixes (`module.`, `model.`) shared by every name are removed first, and BatchNorm's
/// `num_batches_tracked` counters (unused in eval mode) are ignored. Any missing, unexpected or
/// mis-shaped tensor is an error that lists them all with their shapes.
pub fn load_into(vs: &VarStore, mut tensors: Vec<(String, Tensor)>, source: &str) -> Result<()> {
    let vars = vs.variables();
    for prefix in WRAPPER_PREFIXES {
        if tensors.iter().all(|(n, _)| n.starts_with(prefix))
            && !vars.keys().all(|n| n.starts_with(prefix))
        {
            for (n, _) in tensors.iter_mut() {
                n.drain(..prefix.len());
            }
        }
    }
    tensors.retain(|(n, _)| !n.ends_with("num_batches_tracked"));
    let mut unexpected = Vec::new();
    let mut misshaped = Vec::new();
    let mut found = BTreeSet::new();
    for (name, t) in &tensors {
        match vars.get(name) {
            None => unexpected.push(format!("{name} {:?}", t.size())),
            Some(v) => {
                found.insert(name.as_str());
                if v.size() != t.size() {
                    misshaped.push(format!("{name}: file {:?}, model {:?}", t.size(), v.size()));
                }
            }
        }
    }
    let mut missing: Vec<String> = vars
        .iter()
        .filter(|(n, _)| !found.contains(n.as_str()))
        .map(|(n, v)| format!("{n} {:?}", v.size()))
        .collect();
    if !(missing.is_empty() && unexpected.is_empty() && misshaped.is_empty()) {
        missing.sort();
        unexpected.sort();
        misshaped.sort();
        let mut msg = format!("{source}: the weights do not match the architecture");
        for (what, list) in [
            ("mis-shaped", &misshaped),
            ("missing from the file", &missing),
            ("unexpected in the file", &unexpected),
        ] {
            if !list.is_empty() {
                msg += &format!("\n  {} {what}: {}", list.len(), summarize(list));
            }
        }
        bail!(msg);
    }
    tch::no_grad(|| -> Result<()> {
        for (name, t) in &tensors {
            let mut v = vars[name].shallow_clone();
            v.f_copy_(&t.f_to_kind(v.kind())?)
                .with_context(|| format!("{source}: copying {name}"))?;
        }
        Ok(())
    })
}

/// At most 12 items, then a count of the rest.
fn summarize(list: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = list
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > SHOWN {
        s += &format!(", ... and {} more", list.len() - SHOWN);
    }
    s
}
