//! Request bodies to pixels: JSON nested arrays, NPY, PNG/JPEG. Every malformed input is a
//! 4xx [`ApiError`] naming what is wrong.

use axum::http::StatusCode;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::ApiError;

/// Decoded images: `n` images of the model's `[C, H, W]`, flattened NCHW, values in `[0, 1]`.
#[derive(Debug)]
pub struct Images {
    pub pixels: Vec<f32>,
    pub n: usize,
}

/// Length of an NPY file's magic, version and header: the data starts there. `None` when the
/// bytes are not an NPY prefix (npyz then reports what is wrong).
fn npy_header_len(body: &[u8]) -> Option<usize> {
    if body.len() < 12 || !body.starts_with(b"\x93NUMPY") {
        return None;
    }
    let len = match body[6] {
        1 => 10 + usize::from(u16::from_le_bytes([body[8], body[9]])),
        _ => 12 + u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize,
    };
    (len <= body.len()).then_some(len)
}

thread_local! {
    /// The last NPY header this HTTP thread parsed, with its bytes: clients send the same
    /// header again and again, and npyz's parser (a Python-literal grammar) takes ~34 µs, a
    /// fifth of a small model's forward pass.
    static LAST_NPY_HEADER: std::cell::RefCell<Option<(Vec<u8>, npyz::NpyHeader)>> =
        const { std::cell::RefCell::new(None) };
}

/// Opens an NPY body, reusing the last parsed header when the bytes are the same.
fn open_npy(body: &[u8]) -> Result<npyz::NpyFile<&[u8]>, ApiError> {
    let invalid = |e: std::io::Error| bad(format!("invalid NPY: {e}"));
    let Some(len) = npy_header_len(body) else {
        return npyz::NpyFile::new(body).map_err(invalid);
    };
    let (head, data) = body.split_at(len);
    let cached = LAST_NPY_HEADER.with_borrow(|c| {
        c.as_ref()
            .filter(|(bytes, _)| bytes == head)
            .map(|(_, h)| h.clone())
    });
    if let Some(h) = cached {
        return Ok(npyz::NpyFile::with_header(h, data));
    }
    let npy = npyz::NpyFile::new(body).map_err(invalid)?;
    LAST_NPY_HEADER.set(Some((head.to_vec(), npy.header().clone())));
    Ok(npy)
}

/// Limits and the expected shape.
#[derive(Debug, Clone, Copy)]
pub struct InputSpec {
    pub shape: [i64; 3],
    pub max_images: usize,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

impl InputSpec {
    fn per_image(&self) -> usize {
        self.shape.iter().product::<i64>() as usize
    }

    /// Checks a `[C, H, W]` or `[N, C, H, W]` shape and returns N.
    fn count(&self, shape: &[usize]) -> Result<usize, ApiError> {
        let want: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        let n = match shape.len() {
            3 if shape == want.as_slice() => 1,
            4 if shape[1..] == want[..] => shape[0],
            _ => {
                return Err(bad(format!(
                    "images have shape {shape:?}; the model expects [C, H, W] = {want:?} or [N, {}, {}, {}]",
                    want[0], want[1], want[2]
                )))
            }
        };
        if n == 0 {
            return Err(bad("the request holds no image"));
        }
        if n > self.max_images {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{n} images in one request; at most {} are accepted",
                    self.max_images
                ),
            ));
        }
        Ok(n)
    }

    /// Decodes a body by its `Content-Type`.
    pub fn decode(&self, content_type: Option<&str>, body: &[u8]) -> Result<Images, ApiError> {
        let mime = content_type
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_ascii_lowercase());
        let images = match mime.as_deref() {
            Some("application/json") => self.json(body)?,
            Some("application/x-npy") | Some("application/npy") => self.npy(body)?,
            Some("image/png") | Some("image/jpeg") | Some("image/jpg") => self.picture(body)?,
            other => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "Content-Type {} is not accepted: send application/json, application/x-npy, image/png or image/jpeg",
                        other.unwrap_or("(none)")
                    ),
                ))
            }
        };
        // A fold without early exit vectorises: 0.3 µs instead of 4.5 µs for one CIFAR image.
        // NaN fails both comparisons.
        let in_range = |v: &f32| *v >= 0.0 && *v <= 1.0;
        if images.pixels.iter().fold(true, |ok, v| ok & in_range(v)) {
            return Ok(images);
        }
        // Rejected: find the first offending value for the message.
        match images.pixels.iter().find(|v| !in_range(v)) {
            Some(v) => Err(bad(format!("pixel value {v} is outside [0, 1]"))),
            None => Ok(images),
        }
    }

    /// `{"images": [...]}` with `[C][H][W]` or `[N][C][H][W]` nested arrays of numbers, read in
    /// one pass straight into the pixel vector, without a `serde_json::Value` tree. Most of the
    /// time (~0.25 ms for one CIFAR image) is serde_json's exact float parsing: send NPY when
    /// latency matters.
    fn json(&self, body: &[u8]) -> Result<Images, ApiError> {
        let mut nested = Nested::default();
        let mut de = serde_json::Deserializer::from_slice(body);
        let found = Body(&mut nested)
            .deserialize(&mut de)
            .and_then(|found| de.end().map(|()| found))
            .map_err(|e| bad(format!("invalid JSON body: {e}")))?;
        if !found {
            return Err(bad(
                "the JSON body must be an object with an \"images\" field",
            ));
        }
        let depth = nested.leaf.unwrap_or(nested.dims.len());
        let shape: Vec<usize> = nested.dims[..depth.min(nested.dims.len())]
            .iter()
            .map(|d| d.unwrap_or(0))
            .collect();
        let n = self.count(&shape)?;
        debug_assert_eq!(nested.values.len(), n * self.per_image());
        Ok(Images {
            pixels: nested.values,
            n,
        })
    }

    /// NPY array, C order, float32/float64 in `[0, 1]` or uint8 (divided by 255).
    fn npy(&self, body: &[u8]) -> Result<Images, ApiError> {
        let npy = open_npy(body)?;
        if npy.order() != npyz::Order::C {
            return Err(bad("NPY array is in Fortran order; send a C-ordered array"));
        }
        let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
        let n = self.count(&shape)?;
        let npyz::DType::Plain(ts) = npy.dtype() else {
            return Err(bad("NPY dtype must be a plain float32, float64 or uint8"));
        };
        let read_err = |e: std::io::Error| bad(format!("reading NPY data: {e}"));
        let pixels: Vec<f32> = match (ts.type_char(), ts.size_field()) {
            // The common body, little-endian float32, is converted in bulk: npyz reads element
            // by element (~60 µs for one CIFAR image, a third of a small model's forward).
            (npyz::TypeChar::Float, 4) if ts.endianness() == npyz::Endianness::Little => {
                let want = n * self.per_image();
                let data = npy.into_inner();
                if data.len() < 4 * want {
                    return Err(bad(format!(
                        "NPY data holds {} bytes; its shape needs {}",
                        data.len(),
                        4 * want
                    )));
                }
                data[..4 * want]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            }
            (npyz::TypeChar::Float, 4) => npy.into_vec::<f32>().map_err(read_err)?,
            (npyz::TypeChar::Float, 8) => npy
                .into_vec::<f64>()
                .map_err(read_err)?
                .into_iter()
                .map(|v| v as f32)
                .collect(),
            (npyz::TypeChar::Uint, 1) => npy
                .into_vec::<u8>()
                .map_err(read_err)?
                .into_iter()
                .map(|v| f32::from(v) / 255.0)
                .collect(),
            _ => {
                return Err(bad(format!(
                    "NPY dtype {ts} is not accepted: use float32, float64 or uint8"
                )))
            }
        };
        Ok(Images { pixels, n })
    }

    /// One PNG or JPEG image of the model's height and width (RGB for 3 channels, grey for 1).
    fn picture(&self, body: &[u8]) -> Result<Images, ApiError> {
        let [c, h, w] = self.shape;
        let img = image::load_from_memory(body)
            .map_err(|e| bad(format!("cannot decode the image: {e}")))?;
        if i64::from(img.height()) != h || i64::from(img.width()) != w {
            return Err(bad(format!(
                "image is {}x{} (width x height); the model expects {w}x{h}",
                img.width(),
                img.height()
            )));
        }
        let hwc: Vec<u8> = match c {
            3 => img.to_rgb8().into_raw(),
            1 => img.to_luma8().into_raw(),
            _ => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("PNG/JPEG input needs a 1- or 3-channel model, this one has {c}"),
                ))
            }
        };
        let (c, hw) = (c as usize, (h * w) as usize);
        let mut pixels = vec![0f32; c * hw];
        for (i, &v) in hwc.iter().enumerate() {
            pixels[(i % c) * hw + i / c] = f32::from(v) / 255.0;
        }
        Ok(Images { pixels, n: 1 })
    }
}

/// Deepest nesting accepted for `images` (`[N][C][H][W]`).
const MAX_DEPTH: usize = 4;

/// Nested JSON arrays of numbers, flattened while they are parsed. The length at each depth is
/// fixed by the first array that ends there and every later array at that depth must match;
/// numbers must all sit at the same depth.
#[derive(Default)]
struct Nested {
    dims: Vec<Option<usize>>,
    /// Depth of the numbers, once one is seen.
    leaf: Option<usize>,
    values: Vec<f32>,
    /// Position of the element being read, for error messages.
    at: Vec<usize>,
}

/// The top-level object: finds `images` (at most once), skips other fields.
struct Body<'a>(&'a mut Nested);

impl<'de> DeserializeSeed<'de> for Body<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Body<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object with an \"images\" field")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut found = false;
        while let Some(key) = map.next_key::<String>()? {
            if key != "images" {
                map.next_value::<IgnoredAny>()?;
            } else if found {
                return Err(de::Error::duplicate_field("images"));
            } else {
                map.next_value_seed(Level {
                    depth: 0,
                    nested: &mut *self.0,
                })?;
                found = true;
            }
        }
        Ok(found)
    }
}

/// One value of `images` at `depth`: a number or an array.
struct Level<'a> {
    depth: usize,
    nested: &'a mut Nested,
}

impl<'de> DeserializeSeed<'de> for Level<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Level<'_> {
    fn number<E: de::Error>(self, v: f64) -> Result<(), E> {
        let n = self.nested;
        match n.leaf {
            None => n.leaf = Some(self.depth),
            Some(l) if l != self.depth => {
                return Err(E::custom(format!(
                    "images{:?} is a number where the other entries are arrays (ragged array)",
                    n.at
                )))
            }
            Some(_) => {}
        }
        n.values.push(v as f32);
        Ok(())
    }
}

impl<'de> Visitor<'de> for Level<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number or an array of numbers")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.number(v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.number(v as f64)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.number(v as f64)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (depth, n) = (self.depth, self.nested);
        if depth >= MAX_DEPTH || n.leaf.is_some_and(|l| depth >= l) {
            return Err(de::Error::custom(format!(
                "images{:?} is an array where numbers are expected (ragged array, or more than {MAX_DEPTH} levels)",
                n.at
            )));
        }
        let mut len = 0;
        n.at.push(0);
        while seq
            .next_element_seed(Level {
                depth: depth + 1,
                nested: &mut *n,
            })?
            .is_some()
        {
            len += 1;
            if let Some(i) = n.at.last_mut() {
                *i = len;
            }
        }
        n.at.pop();
        if n.dims.len() <= depth {
            n.dims.resize(depth + 1, None);
        }
        match n.dims[depth] {
            None => n.dims[depth] = Some(len),
            Some(want) if want != len => {
                return Err(de::Error::custom(format!(
                    "images{:?} has {len} elements where the first array at that depth has {want} (ragged array)",
                    n.at
                )))
            }
            Some(_) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: InputSpec = InputSpec {
        shape: [1, 2, 2],
        max_images: 2,
    };

    fn status(r: Result<Images, ApiError>) -> u16 {
        r.map(|_| 200).unwrap_or_else(|e| e.status.as_u16())
    }

    #[test]
    fn json_single_and_batch() {
        let one = SPEC
            .decode(
                Some("application/json"),
                br#"{"images": [[[0, 0.25], [0.5, 1]]]}"#,
            )
            .unwrap();
        assert_eq!((one.n, one.pixels), (1, vec![0.0, 0.25, 0.5, 1.0]));
        let two = SPEC
            .decode(
                Some("application/json; charset=utf-8"),
                br#"{"images": [[[[0, 0], [0, 0]]], [[[1, 1], [1, 0.5]]]]}"#,
            )
            .unwrap();
        assert_eq!(two.n, 2);
        assert_eq!(two.pixels[7], 0.5);
    }

    #[test]
    fn malformed_inputs_are_client_errors() {
        let j = |b: &[u8]| status(SPEC.decode(Some("application/json"), b));
        assert_eq!(j(b"{"), 400);
        assert_eq!(j(br#"{"imgs": []}"#), 400);
        assert_eq!(j(br#"{"images": [[[0, 0], [0]]]}"#), 400); // ragged
        for ragged in [
            &br#"{"images": [[[0, 0], 0]]}"#[..],
            br#"{"images": [[0, [0, 0]]]}"#,
            br#"{"images": [[[0, 0], [0, 0]], [[0, 0]]]}"#,
            br#"{"images": [[[[[0]]]]]}"#,
        ] {
            let err = SPEC.decode(Some("application/json"), ragged).unwrap_err();
            assert_eq!(err.status, 400);
            assert!(err.message.contains("ragged"), "{}", err.message);
        }
        assert_eq!(j(br#"{"images": [[[0, 0], [0, 0]]], "images": []}"#), 400);
        assert_eq!(j(br#"{"images": [[[0, 0], [0, 0]]]} trailing"#), 400);
        // Other fields are ignored.
        assert_eq!(
            SPEC.decode(
                Some("application/json"),
                br#"{"id": {"a": [1, "x"]}, "images": [[[0, 0], [0, 1]]]}"#
            )
            .unwrap()
            .pixels,
            vec![0.0, 0.0, 0.0, 1.0]
        );
        assert_eq!(j(br#"{"images": [[[0, 0, 0], [0, 0, 0]]]}"#), 400); // wrong shape
        assert_eq!(j(br#"{"images": [[["a", 0], [0, 0]]]}"#), 400);
        assert_eq!(j(br#"{"images": [[[2, 0], [0, 0]]]}"#), 400); // out of range
        assert_eq!(j(br#"{"images": []}"#), 400);
        let three = br#"{"images": [[[[0,0],[0,0]]],[[[0,0],[0,0]]],[[[0,0],[0,0]]]]}"#;
        assert_eq!(j(three), 413);
        assert_eq!(status(SPEC.decode(Some("text/plain"), b"x")), 415);
        assert_eq!(status(SPEC.decode(None, b"x")), 415);
        assert_eq!(
            status(SPEC.decode(Some("application/x-npy"), b"\x93NUMPY garbage")),
            400
        );
        assert_eq!(status(SPEC.decode(Some("image/png"), b"not a png")), 400);
    }

    /// Four values as an NPY file of SPEC's shape `[1, 1, 2, 2]`, with NPY dtype `dtype`.
    fn npy<T: npyz::Serialize>(dtype: &str, values: [T; 4]) -> Vec<u8> {
        use npyz::WriterBuilder;
        let mut buf = Vec::new();
        let mut w = npyz::WriteOptions::<T>::new()
            .dtype(npyz::DType::parse(&format!("'{dtype}'")).unwrap())
            .shape(&[1, 1, 2, 2])
            .writer(&mut buf)
            .begin_nd()
            .unwrap();
        w.extend(values).unwrap();
        w.finish().unwrap();
        buf
    }

    #[test]
    fn npy_uint8_and_float() {
        let im = SPEC
            .decode(Some("application/x-npy"), &npy("|u1", [0u8, 51, 102, 255]))
            .unwrap();
        assert_eq!(im.pixels, vec![0.0, 0.2, 0.4, 1.0]);
        // float32, little- and big-endian, and a body cut short.
        let values = [0.0f32, 0.25, 0.5, 1.0];
        for dtype in ["<f4", ">f4"] {
            let buf = npy(dtype, values);
            let im = SPEC.decode(Some("application/x-npy"), &buf).unwrap();
            assert_eq!(im.pixels, values, "{dtype}");
            let cut = &buf[..buf.len() - 4];
            assert_eq!(
                status(SPEC.decode(Some("application/x-npy"), cut)),
                400,
                "{dtype}"
            );
        }
    }

    #[test]
    fn pixels_outside_the_unit_interval_or_nan_are_rejected() {
        let decode = |v| SPEC.decode(Some("application/x-npy"), &npy("<f4", v));
        assert_eq!(status(decode([0.0, 0.5, 1.0, 1.0])), 200);
        for bad in [f32::NAN, -1e-7, 1.000_001, f32::INFINITY, f32::NEG_INFINITY] {
            let err = decode([0.5, 0.5, 0.5, bad]).unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{bad}");
            assert!(err.message.contains(&bad.to_string()), "{}", err.message);
        }
    }

    #[test]
    fn png_is_converted_to_chw() {
        let spec = InputSpec {
            shape: [3, 1, 2],
            max_images: 1,
        };
        let img = image::RgbImage::from_raw(2, 1, vec![255, 0, 0, 0, 0, 255]).unwrap();
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let im = spec.decode(Some("image/png"), &png).unwrap();
        // Channel-major: R = (1, 0), G = (0, 0), B = (0, 1).
        assert_eq!(im.pixels, vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        let wrong = InputSpec {
            shape: [3, 2, 2],
            max_images: 1,
        };
        assert_eq!(status(wrong.decode(Some("image/png"), &png)), 400);
    }
}
