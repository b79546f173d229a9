//! Reading named weight tensors from PyTorch checkpoints and safetensors files, and copying them
//! into a tch `VarStore` whose variable names are the PyTorch `state_dict` names.
//!
//! Formats: safetensors; `torch.save` zip archives (PyTorch >= 1.6); the legacy (pre-1.6)
//! stream of pickles followed by raw storages. Pickles are parsed with `repugnant-pickle`;
//! the PyTorch conventions on top of it (persistent storage ids, `_rebuild_tensor_v2`,
//! `OrderedDict`, checkpoint nesting) are interpreted here because no light crate does so
//! for both the zip and the legacy layout.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use repugnant_pickle::eval::PickleMemo;
use repugnant_pickle::ops::PickleOp;
use repugnant_pickle::{evaluate, parsers::parse_op, SequenceType, Value};
use tch::{nn::VarStore, Kind, Tensor};

use crate::data::bounded;

/// Deepest nesting of a pickled value accepted. A `state_dict` is about ten levels deep; the
/// bound keeps the recursive value tree (its evaluation, reference resolution, interpretation
/// and drop) far from the stack's limit and below repugnant-pickle's own cut-off of 250 levels,
/// past which it would silently leave references unresolved.
const MAX_PICKLE_DEPTH: u32 = 128;

/// Value nodes a pickle may make per opcode, plus [`PICKLE_NODES_BASE`]: a `state_dict` makes
/// about one per opcode, while `DUP`, memo copies and shared references can make quadratically
/// or exponentially many from a few bytes.
const PICKLE_NODES_PER_OP: u64 = 16;
const PICKLE_NODES_BASE: u64 = 1 << 20;

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
        let (size, packed) = (entry.size(), entry.compressed_size());
        ensure!(
            size <= bounded::inflate_cap(packed),
            "archive entry {name} declares {size} bytes from {packed} compressed, more than deflate can produce (corrupt or hostile archive)"
        );
        bounded::read_exact_declared(&mut entry, size, &format!("archive entry {name}"))
    };
    let data = read_entry(&mut zip, &pkl)?;
    let (ops, _) = parse_pickle(&data).with_context(|| format!("archive entry {pkl}"))?;
    let refs = tensor_refs(&ops).with_context(|| format!("archive entry {pkl}"))?;
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
    let vals = evaluate_bounded(&key_ops).context("legacy storage key list")?;
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

/// Evaluates a pickle's opcodes with resolved references, after checking that the values they
/// build stay within [`MAX_PICKLE_DEPTH`] and a node budget linear in the opcode count.
/// Unchecked, a million nested tuples overflow the stack, and `DUP` or shared references make
/// quadratic or exponential work from a few bytes.
fn evaluate_bounded<'a>(ops: &'a [PickleOp<'a>]) -> Result<Vec<Value<'a>>> {
    let budget = pickle_budget(ops);
    PickleScan::new(budget).run(ops)?;
    // References resolve late (a list can grow after it was referenced) and can share or
    // cycle, so their expansion is measured on the unresolved values before it is made.
    let (vals, memo) = evaluate(ops, false)?;
    let mut measure = Expansion {
        memo: &memo,
        cache: HashMap::new(),
    };
    let mut nodes: u64 = 0;
    for v in &vals {
        nodes = nodes.saturating_add(measure.size(v, 1)?.nodes);
    }
    ensure!(
        nodes <= budget,
        "pickle references expand to more than {budget} values (corrupt or hostile file)"
    );
    drop(vals);
    Ok(evaluate(ops, true)?.0)
}

fn pickle_budget(ops: &[PickleOp<'_>]) -> u64 {
    PICKLE_NODES_BASE.saturating_add(PICKLE_NODES_PER_OP.saturating_mul(ops.len() as u64))
}

/// Checks one pickle (up to its STOP) against the bounds the weights readers apply, without
/// evaluating it: for pickles another parser reads, such as the members of a TorchScript
/// archive before libtorch's unpickler sees them.
pub fn check_pickle(bytes: &[u8]) -> Result<()> {
    let (ops, _) = parse_pickle(bytes)?;
    PickleScan::new(pickle_budget(&ops)).run(&ops)
}

/// Size and depth of a value as evaluation materialises it (references count as one node).
#[derive(Clone, Copy)]
struct Extent {
    nodes: u64,
    depth: u32,
}

impl Extent {
    const LEAF: Extent = Extent { nodes: 1, depth: 1 };

    /// A container of `items`, `levels` deep around them.
    fn around(items: &[Extent], levels: u32) -> Extent {
        Extent {
            nodes: items
                .iter()
                .fold(levels as u64, |n, e| n.saturating_add(e.nodes)),
            depth: items.iter().map(|e| e.depth).max().unwrap_or(0) + levels,
        }
    }
}

/// One slot of the simulated pickle stack.
#[derive(Clone, Copy)]
enum Slot {
    Mark,
    /// A value; `Some(id)` when it is a memo reference.
    Item(Extent, Option<u32>),
}

/// A linear pass over the opcodes that mirrors repugnant-pickle's stack machine with sizes in
/// place of values. It stops quietly where evaluation itself would fail (an underrun, a missing
/// MARK), leaving that error to the evaluation.
struct PickleScan {
    stack: Vec<Slot>,
    memo: HashMap<u32, Slot>,
    made: u64,
    budget: u64,
}

impl PickleScan {
    fn new(budget: u64) -> Self {
        PickleScan {
            stack: Vec::new(),
            memo: HashMap::new(),
            made: 0,
            budget,
        }
    }

    fn run(mut self, ops: &[PickleOp<'_>]) -> Result<()> {
        for (i, op) in ops.iter().enumerate() {
            match self.step(op) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => return Err(e.context(format!("pickle opcode {i} of {}", ops.len()))),
            }
        }
        Ok(())
    }

    /// Records `e` as newly made; errors past the depth or node budget.
    fn make(&mut self, e: Extent) -> Result<Extent> {
        self.made = self.made.saturating_add(e.nodes);
        ensure!(
            e.depth <= MAX_PICKLE_DEPTH,
            "pickle nests values more than {MAX_PICKLE_DEPTH} levels deep (corrupt or hostile file)"
        );
        ensure!(
            self.made <= self.budget,
            "pickle builds more than {} values (corrupt or hostile file)",
            self.budget
        );
        Ok(e)
    }

    fn push(&mut self, e: Extent) -> Result<()> {
        let e = self.make(e)?;
        self.stack.push(Slot::Item(e, None));
        Ok(())
    }

    fn pop(&mut self) -> Option<Slot> {
        self.stack.pop()
    }

    fn pop_item(&mut self) -> Option<(Extent, Option<u32>)> {
        match self.pop()? {
            Slot::Item(e, r) => Some((e, r)),
            Slot::Mark => Some((Extent::LEAF, None)),
        }
    }

    /// The items above the topmost MARK (removed with it); `None` without a MARK.
    fn pop_mark(&mut self) -> Option<Vec<Extent>> {
        let at = self.stack.iter().rposition(|s| matches!(s, Slot::Mark))?;
        let items = self.stack[at + 1..]
            .iter()
            .map(|s| match s {
                Slot::Item(e, _) => *e,
                Slot::Mark => Extent::LEAF,
            })
            .collect();
        self.stack.truncate(at);
        Some(items)
    }

    /// The memo entry a reference chain ends at (repugnant-pickle follows at most 250 links).
    fn target(&self, mut id: u32) -> Option<u32> {
        for _ in 0..250 {
            match self.memo.get(&id)? {
                Slot::Item(_, Some(next)) => id = *next,
                _ => return Some(id),
            }
        }
        Some(id)
    }

    /// What evaluation copies when it resolves a value: the memo entry for a reference.
    fn resolved(&mut self, (e, r): (Extent, Option<u32>)) -> Result<Extent> {
        match r
            .and_then(|id| self.target(id))
            .and_then(|id| self.memo.get(&id))
        {
            Some(Slot::Item(m, _)) => {
                let m = *m;
                self.make(m)
            }
            _ => Ok(e),
        }
    }

    /// Adds `items` (each `levels` deep inside) to the container on top of the stack, or to
    /// the memo entry it refers to.
    fn extend_top(&mut self, items: &[Extent], levels: u32) -> Result<()> {
        let added = Extent::around(items, levels);
        let Some(Slot::Item(top, r)) = self.stack.last().copied() else {
            return Ok(());
        };
        let grow = |e: Extent| Extent {
            nodes: e.nodes.saturating_add(added.nodes),
            depth: e.depth.max(added.depth + 1),
        };
        self.make(added)?;
        if let Some(id) = r.and_then(|id| self.target(id)) {
            if let Some(Slot::Item(m, mr)) = self.memo.get(&id).copied() {
                let g = grow(m);
                self.make(Extent {
                    nodes: 0,
                    depth: g.depth,
                })?;
                self.memo.insert(id, Slot::Item(g, mr));
                return Ok(());
            }
        }
        let g = grow(top);
        self.make(Extent {
            nodes: 0,
            depth: g.depth,
        })?;
        *self.stack.last_mut().expect("checked above") = Slot::Item(g, r);
        Ok(())
    }

    /// One opcode; `Ok(false)` where evaluation stops (STOP, or an error it will report).
    fn step(&mut self, op: &PickleOp<'_>) -> Result<bool> {
        macro_rules! or_stop {
            ($e:expr) => {
                match $e {
                    Some(v) => v,
                    None => return Ok(false),
                }
            };
        }
        match op {
            PickleOp::MARK => self.stack.push(Slot::Mark),
            PickleOp::STOP => return Ok(false),
            PickleOp::POP => {
                or_stop!(self.pop());
            }
            PickleOp::POP_MARK => {
                or_stop!(self.pop_mark());
            }
            PickleOp::DUP => {
                let top = *or_stop!(self.stack.last());
                if let Slot::Item(e, _) = top {
                    self.make(e)?;
                }
                self.stack.push(top);
            }
            PickleOp::PERSID(_) => self.push(Extent { nodes: 2, depth: 2 })?,
            PickleOp::BINPERSID => {
                let (e, _) = or_stop!(self.pop_item());
                self.push(Extent::around(&[e], 1))?;
            }
            PickleOp::REDUCE | PickleOp::BUILD | PickleOp::NEWOBJ | PickleOp::STACK_GLOBAL => {
                let a = or_stop!(self.pop_item());
                let b = or_stop!(self.pop_item());
                let resolve = !matches!(op, PickleOp::NEWOBJ);
                let (a, b) = if resolve {
                    (self.resolved(a)?, self.resolved(b)?)
                } else {
                    (a.0, b.0)
                };
                self.push(Extent::around(&[a, b], 2))?;
            }
            PickleOp::GET(_) | PickleOp::BINGET(_) | PickleOp::LONG_BINGET(_) => {
                let id = or_stop!(memo_id(op));
                self.make(Extent::LEAF)?;
                self.stack.push(Slot::Item(Extent::LEAF, Some(id)));
            }
            PickleOp::PUT(_) | PickleOp::BINPUT(_) | PickleOp::LONG_BINPUT(_) => {
                let id = or_stop!(memo_id(op));
                let top = or_stop!(self.pop());
                self.memo.insert(id, top);
                self.stack.push(Slot::Item(Extent::LEAF, Some(id)));
            }
            PickleOp::MEMOIZE => {
                let top = *or_stop!(self.stack.last());
                if let Slot::Item(e, _) = top {
                    self.make(e)?;
                }
                self.memo.insert(self.memo.len() as u32, top);
            }
            PickleOp::TUPLE | PickleOp::LIST | PickleOp::FROZENSET => {
                let items = or_stop!(self.pop_mark());
                self.push(Extent::around(&items, 1))?;
            }
            PickleOp::DICT => {
                let items = or_stop!(self.pop_mark());
                self.push(Extent::around(&items, 2))?;
            }
            PickleOp::INST(..) => {
                let items = or_stop!(self.pop_mark());
                self.push(Extent::around(&items, 2))?;
            }
            PickleOp::OBJ => {
                let items = or_stop!(self.pop_mark());
                // repugnant-pickle indexes the class after the MARK without checking it exists.
                ensure!(
                    !items.is_empty(),
                    "OBJ opcode without a class after its MARK"
                );
                self.push(Extent::around(&items, 1))?;
            }
            PickleOp::TUPLE1 | PickleOp::TUPLE2 | PickleOp::TUPLE3 => {
                let k = match op {
                    PickleOp::TUPLE1 => 1,
                    PickleOp::TUPLE2 => 2,
                    _ => 3,
                };
                let mut items = Vec::with_capacity(k);
                for _ in 0..k {
                    items.push(or_stop!(self.pop_item()).0);
                }
                self.push(Extent::around(&items, 1))?;
            }
            PickleOp::NEWOBJ_EX => {
                let mut items = Vec::with_capacity(3);
                for _ in 0..3 {
                    items.push(or_stop!(self.pop_item()).0);
                }
                self.push(Extent::around(&items, 2))?;
            }
            PickleOp::EMPTY_DICT
            | PickleOp::EMPTY_LIST
            | PickleOp::EMPTY_TUPLE
            | PickleOp::EMPTY_SET => self.push(Extent::LEAF)?,
            PickleOp::SETITEM => {
                let v = or_stop!(self.pop_item()).0;
                let k = or_stop!(self.pop_item()).0;
                or_stop!(self.stack.last());
                self.extend_top(&[k, v], 1)?;
            }
            PickleOp::SETITEMS => {
                let items = or_stop!(self.pop_mark());
                or_stop!(self.stack.last());
                self.extend_top(&items, 2)?;
            }
            PickleOp::APPEND => {
                let v = or_stop!(self.pop_item()).0;
                or_stop!(self.stack.last());
                self.extend_top(&[v], 0)?;
            }
            PickleOp::APPENDS | PickleOp::ADDITEMS => {
                let items = or_stop!(self.pop_mark());
                or_stop!(self.stack.last());
                self.extend_top(&items, 0)?;
            }
            PickleOp::PROTO(_) => {}
            _ => self.push(Extent::LEAF)?,
        }
        Ok(true)
    }
}

/// The memo id of a GET/PUT opcode; `None` where evaluation would fail to parse it.
fn memo_id(op: &PickleOp<'_>) -> Option<u32> {
    match op {
        PickleOp::GET(s) | PickleOp::PUT(s) => s.parse().ok(),
        PickleOp::BINGET(i) | PickleOp::BINPUT(i) => Some(*i as u32),
        PickleOp::LONG_BINGET(i) | PickleOp::LONG_BINPUT(i) => Some(*i),
        _ => None,
    }
}

/// The size and depth the evaluated values reach once every memo reference is replaced by a
/// copy of its target, computed once per memo entry; a reference cycle is an error.
struct Expansion<'m, 'a> {
    memo: &'m PickleMemo<'a>,
    /// `None` while an entry is being measured (seeing it again means a cycle).
    cache: HashMap<u32, Option<Extent>>,
}

impl Expansion<'_, '_> {
    fn size(&mut self, v: &Value<'_>, depth: u32) -> Result<Extent> {
        ensure!(
            depth <= MAX_PICKLE_DEPTH,
            "pickle references nest more than {MAX_PICKLE_DEPTH} levels deep (corrupt or hostile file)"
        );
        let e = match v {
            Value::Ref(id) => {
                let Some(target) = self.memo.0.get(id) else {
                    return Ok(Extent::LEAF); // evaluation reports the bad id
                };
                match self.cache.get(id) {
                    Some(Some(e)) => *e,
                    Some(None) => {
                        bail!("pickle memo entry {id} refers to itself (corrupt or hostile file)")
                    }
                    None => {
                        self.cache.insert(*id, None);
                        let e = self.size(target, depth + 1)?;
                        self.cache.insert(*id, Some(e));
                        e
                    }
                }
            }
            Value::App(a, items) | Value::Object(a, items) | Value::Global(a, items) => {
                let mut parts = vec![self.size(a, depth + 1)?];
                for it in items {
                    parts.push(self.size(it, depth + 1)?);
                }
                Extent::around(&parts, 1)
            }
            Value::Build(a, b) => {
                let parts = [self.size(a, depth + 1)?, self.size(b, depth + 1)?];
                Extent::around(&parts, 1)
            }
            Value::PersId(a) => Extent::around(&[self.size(a, depth + 1)?], 1),
            Value::Seq(_, items) => {
                let mut parts = Vec::with_capacity(items.len());
                for it in items {
                    parts.push(self.size(it, depth + 1)?);
                }
                Extent::around(&parts, 1)
            }
            _ => Extent::LEAF,
        };
        ensure!(
            depth + e.depth <= MAX_PICKLE_DEPTH + 1,
            "pickle references nest more than {MAX_PICKLE_DEPTH} levels deep (corrupt or hostile file)"
        );
        Ok(e)
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
    let vals = evaluate_bounded(ops)?;
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
            ensure!(
                r.shape.len() == r.stride.len() && r.shape.iter().chain(&r.stride).all(|&s| s >= 0),
                "{name}: shape {:?} and stride {:?} do not describe a tensor",
                r.shape,
                r.stride
            );
            let dims: Vec<u64> = r.shape.iter().map(|&s| s as u64).collect();
            let count = bounded::numel(&dims, &name)?;
            // Largest element index the view touches must lie inside the storage, and the copy
            // may not be larger than the storage (a state_dict holds no broadcast views; a
            // hostile stride of 0 would otherwise make a small file allocate without bound).
            let extent = r.shape.iter().zip(&r.stride).try_fold(r.offset, |acc, (s, st)| {
                (s - 1).max(0).checked_mul(*st).and_then(|x| acc.checked_add(x))
            });
            ensure!(
                count == 0 || (r.offset >= 0 && extent.is_some_and(|e| e < numel) && count <= numel as u64),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(bytes: usize) -> HashMap<String, Vec<u8>> {
        HashMap::from([("0".to_owned(), vec![0u8; bytes])])
    }

    fn view(shape: Vec<i64>, stride: Vec<i64>, offset: i64) -> Vec<(String, TensorRef)> {
        let r = TensorRef {
            storage: "0".into(),
            kind: Kind::Float,
            offset,
            shape,
            stride,
        };
        vec![("w".into(), r)]
    }

    #[test]
    fn strided_views_must_fit_their_storage() {
        let ok = build_tensors(view(vec![2, 3], vec![3, 1], 0), &storage(24)).unwrap();
        assert_eq!(ok[0].1.size(), [2, 3]);
        // Stride 0 would make a 2^40-element copy of a 4-byte storage.
        let e = build_tensors(view(vec![1 << 20, 1 << 20], vec![0, 0], 0), &storage(4));
        assert!(format!("{:#}", e.unwrap_err()).contains("does not fit"));
        // (size - 1) * stride overflows i64.
        let e = build_tensors(view(vec![1 << 40, 3], vec![1 << 40, 1], 0), &storage(4));
        assert!(format!("{:#}", e.unwrap_err()).contains("does not fit"));
        // A product of dimensions that wraps.
        let e = build_tensors(
            view(vec![1 << 32, 1 << 32, 2], vec![0, 0, 0], 0),
            &storage(4),
        );
        assert!(format!("{:#}", e.unwrap_err()).contains("more elements"));
        let e = build_tensors(view(vec![2, 3], vec![3, -1], 0), &storage(24));
        assert!(format!("{:#}", e.unwrap_err()).contains("do not describe"));
    }

    #[test]
    fn check_pickle_accepts_torchscript_members_and_rejects_nesting() {
        for f in [
            "tests/fixtures/attack/tiny_cnn.pt",
            "tests/fixtures/native/ts_features.pt",
        ] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            let mut zip = zip::ZipArchive::new(std::fs::File::open(&p).unwrap()).unwrap();
            for i in 0..zip.len() {
                let mut e = zip.by_index(i).unwrap();
                if e.name().ends_with(".pkl") {
                    let mut b = Vec::new();
                    std::io::Read::read_to_end(&mut e, &mut b).unwrap();
                    check_pickle(&b).unwrap_or_else(|err| panic!("{f} {}: {err:#}", e.name()));
                }
            }
        }
        let mut deep = b"\x80\x02)".to_vec();
        deep.extend(std::iter::repeat_n(0x85u8, 1000));
        deep.push(b'.');
        let e = check_pickle(&deep).unwrap_err();
        assert!(format!("{e:#}").contains("levels deep"), "{e:#}");
    }

    #[test]
    fn pickle_scan_accepts_what_torch_writes() {
        // The committed checkpoints still evaluate under the bounds.
        for f in [
            "checkpoint.pt",
            "checkpoint-legacy.pt",
            "cnn-a-legacy.pt",
            "cnn-a.pt",
        ] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/native")
                .join(f);
            let t = read_tensors(&p).unwrap_or_else(|e| panic!("{f}: {e:#}"));
            assert!(!t.is_empty(), "{f}");
        }
    }
}
