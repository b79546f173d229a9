//! Reading the ONNX protobuf: the model file, tensors (initializers, `Constant` values) and node
//! attributes, with errors naming the tensor or attribute.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::{DataLocation, DataType};
use onnx_protobuf::tensor_shape_proto::dimension;
use onnx_protobuf::{type_proto, AttributeProto, ModelProto, TensorProto, ValueInfoProto};
use protobuf::{Enum, Message};
use tch::{Kind, Tensor};

/// Parses an `.onnx` file.
pub(super) fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ModelProto::parse_from_bytes(&bytes)
        .with_context(|| format!("{} is not an ONNX model (protobuf)", path.display()))
}

/// A tensor of the model as a CPU tensor. Floating types become float32 (the input is float32),
/// integer types int64 (they only feed shape arithmetic and indices), booleans stay booleans.
pub(super) fn tensor_from_proto(t: &TensorProto) -> Result<Tensor> {
    let what = || format!("tensor {:?}", t.name);
    if t.data_location.enum_value() == Ok(DataLocation::EXTERNAL) || !t.external_data.is_empty() {
        bail!(
            "{}: weights stored in an external file are not supported; save the model with its weights inside",
            what()
        );
    }
    let dims = t.dims.clone();
    if let Some(d) = dims.iter().find(|d| **d < 0) {
        bail!("{}: negative dimension {d}", what());
    }
    let udims: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    let numel = crate::data::bounded::numel(&udims, &what())? as i64;
    let dtype = DataType::from_i32(t.data_type)
        .ok_or_else(|| anyhow!("{}: unknown data type {}", what(), t.data_type))?;
    let (kind, raw_kind) = match dtype {
        DataType::FLOAT => (Kind::Float, Kind::Float),
        DataType::DOUBLE => (Kind::Float, Kind::Double),
        DataType::FLOAT16 => (Kind::Float, Kind::Half),
        DataType::INT64 => (Kind::Int64, Kind::Int64),
        DataType::INT32 => (Kind::Int64, Kind::Int),
        DataType::INT16 => (Kind::Int64, Kind::Int16),
        DataType::INT8 => (Kind::Int64, Kind::Int8),
        DataType::UINT8 => (Kind::Int64, Kind::Uint8),
        DataType::BOOL => (Kind::Bool, Kind::Bool),
        other => bail!("{}: data type {other:?} is not supported", what()),
    };
    let flat = if !t.raw_data.is_empty() {
        let expected =
            crate::data::bounded::byte_len(&udims, raw_kind.elt_size_in_bytes(), &what())? as usize;
        if t.raw_data.len() != expected {
            bail!(
                "{}: raw_data has {} bytes, dims {dims:?} of {dtype:?} need {expected}",
                what(),
                t.raw_data.len()
            );
        }
        Tensor::f_from_data_size(&t.raw_data, &[numel], raw_kind)?
    } else {
        match dtype {
            DataType::FLOAT => Tensor::from_slice(&t.float_data),
            DataType::DOUBLE => Tensor::from_slice(&t.double_data),
            DataType::INT64 => Tensor::from_slice(&t.int64_data),
            // float16 bits, small integers and booleans live in int32_data.
            DataType::FLOAT16 => {
                let bits: Vec<i16> = t.int32_data.iter().map(|v| *v as u16 as i16).collect();
                Tensor::from_slice(&bits).f_view_dtype(Kind::Half)?
            }
            _ => Tensor::from_slice(&t.int32_data),
        }
    };
    if flat.numel() as i64 != numel {
        bail!(
            "{}: holds {} values but dims {dims:?} need {numel}",
            what(),
            flat.numel()
        );
    }
    Ok(flat.f_to_kind(kind)?.f_reshape(&dims)?)
}

/// Dimensions declared for a graph input: `Some(n)` for a fixed size, `None` for a named or
/// unknown one; `None` overall when the input is not a tensor with a shape.
pub(super) fn declared_dims(v: &ValueInfoProto) -> Option<Vec<Option<i64>>> {
    let ty = v.type_.as_ref()?;
    match &ty.value {
        Some(type_proto::Value::TensorType(t)) => Some(
            t.shape
                .as_ref()?
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(dimension::Value::DimValue(n)) if n > 0 => Some(n),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

/// The attributes of one node; every attribute must be read by the operator's parser, so that
/// an attribute brittle does not implement is an error rather than silently ignored.
pub(super) struct Attrs<'a> {
    list: &'a [AttributeProto],
    used: Vec<bool>,
}

impl<'a> Attrs<'a> {
    pub fn new(list: &'a [AttributeProto]) -> Self {
        Attrs {
            list,
            used: vec![false; list.len()],
        }
    }

    fn get(&mut self, name: &str, ty: AttributeType) -> Result<Option<&'a AttributeProto>> {
        let Some(i) = self.list.iter().position(|a| a.name == name) else {
            return Ok(None);
        };
        self.used[i] = true;
        let a = &self.list[i];
        if !a.ref_attr_name.is_empty() {
            bail!("attribute {name:?} refers to a function attribute, which is not supported");
        }
        let actual = a.type_.enum_value();
        // Old exporters leave the type unset; trust the field then.
        if actual != Ok(ty) && actual != Ok(AttributeType::UNDEFINED) {
            bail!("attribute {name:?} has type {actual:?}, expected {ty:?}");
        }
        Ok(Some(a))
    }

    pub fn opt_int(&mut self, name: &str) -> Result<Option<i64>> {
        Ok(self.get(name, AttributeType::INT)?.map(|a| a.i))
    }

    pub fn int(&mut self, name: &str, default: i64) -> Result<i64> {
        Ok(self.opt_int(name)?.unwrap_or(default))
    }

    pub fn opt_float(&mut self, name: &str) -> Result<Option<f64>> {
        Ok(self.get(name, AttributeType::FLOAT)?.map(|a| a.f as f64))
    }

    pub fn float(&mut self, name: &str, default: f64) -> Result<f64> {
        Ok(self.opt_float(name)?.unwrap_or(default))
    }

    pub fn ints(&mut self, name: &str) -> Result<Option<Vec<i64>>> {
        Ok(self.get(name, AttributeType::INTS)?.map(|a| a.ints.clone()))
    }

    pub fn floats(&mut self, name: &str) -> Result<Option<Vec<f32>>> {
        Ok(self
            .get(name, AttributeType::FLOATS)?
            .map(|a| a.floats.clone()))
    }

    pub fn string(&mut self, name: &str) -> Result<Option<String>> {
        Ok(self
            .get(name, AttributeType::STRING)?
            .map(|a| String::from_utf8_lossy(&a.s).into_owned()))
    }

    pub fn tensor(&mut self, name: &str) -> Result<Option<&'a TensorProto>> {
        match self.get(name, AttributeType::TENSOR)? {
            Some(a) => {
                Ok(Some(a.t.as_ref().ok_or_else(|| {
                    anyhow!("attribute {name:?} has no tensor")
                })?))
            }
            None => Ok(None),
        }
    }

    /// Marks an attribute as understood without reading it (it cannot change the result).
    pub fn ignore(&mut self, name: &str) {
        if let Some(i) = self.list.iter().position(|a| a.name == name) {
            self.used[i] = true;
        }
    }

    /// Fails on the first attribute no parser asked for.
    pub fn finish(self) -> Result<()> {
        match self.used.iter().position(|u| !u) {
            Some(i) => bail!("attribute {:?} is not supported", self.list[i].name),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initializer_dims_that_overflow_are_an_error() {
        let mut t = TensorProto::new();
        t.name = "w".into();
        t.data_type = DataType::FLOAT as i32;
        t.dims = vec![1 << 32, 1 << 32, 4];
        let e = tensor_from_proto(&t).unwrap_err();
        assert!(format!("{e:#}").contains("more elements"), "{e:#}");
        // Raw bytes checked against dims before anything is made.
        t.dims = vec![1 << 20, 1 << 20];
        t.raw_data = vec![0; 16];
        let e = tensor_from_proto(&t).unwrap_err();
        assert!(format!("{e:#}").contains("raw_data has 16 bytes"), "{e:#}");
    }
}
