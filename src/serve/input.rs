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

/// Longest NPY header accepted (numpy's own reader refuses more than 10,000 bytes; a plain
/// array's header is ~120).
pub const MAX_NPY_HEADER: usize = 4096;

/// An NPY body split by [`split_npy`].
struct NpyParts<'a> {
    /// Magic, version and header text: what npyz parses.
    head: &'a [u8],
    shape: Vec<u64>,
    data: &'a [u8],
}

/// Splits an NPY body into its header and its data. The header must be short and of the
/// plain form `{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 32, 32), }`: it is
/// checked here in one linear pass before npyz's Python-literal parser, which backtracks
/// exponentially in the nesting depth (128 bytes of brackets pinned a core), ever sees it.
fn split_npy(body: &[u8]) -> Result<NpyParts<'_>, ApiError> {
    if !body.starts_with(b"\x93NUMPY") || body.len() < 10 {
        return Err(bad(
            "invalid NPY: the body does not start with the NPY magic",
        ));
    }
    let (prefix, text_len) = match body[6] {
        1 => (10usize, usize::from(u16::from_le_bytes([body[8], body[9]]))),
        2 | 3 if body.len() >= 12 => (
            12,
            u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize,
        ),
        v => return Err(bad(format!("invalid NPY: unknown format version {v}"))),
    };
    if text_len > MAX_NPY_HEADER {
        return Err(bad(format!(
            "invalid NPY: the header declares {text_len} bytes; at most {MAX_NPY_HEADER} are accepted"
        )));
    }
    let Some(len) = prefix.checked_add(text_len).filter(|&l| l <= body.len()) else {
        return Err(bad(format!(
            "invalid NPY: the header declares {text_len} bytes; the body holds {}",
            body.len() - prefix
        )));
    };
    let shape =
        plain_npy_shape(&body[prefix..len]).map_err(|e| bad(format!("invalid NPY header: {e}")))?;
    Ok(NpyParts {
        head: &body[..len],
        shape,
        data: &body[len..],
    })
}

/// The shape of a plain NPY header dict, read by a linear scanner that accepts only strings
/// without escapes, `True`/`False` and one level of integer tuple as values (so at most two
/// levels of brackets), and requires exactly the keys `descr` (a string: record dtypes are
/// not accepted anyway), `fortran_order` and `shape`.
fn plain_npy_shape(text: &[u8]) -> Result<Vec<u64>, String> {
    let mut s = Scanner { b: text, i: 0 };
    s.expect(b'{')?;
    let (mut descr, mut order, mut shape) = (false, false, None);
    loop {
        s.ws();
        if s.eat(b'}') {
            break;
        }
        let key = s.string()?;
        s.ws();
        s.expect(b':')?;
        s.ws();
        let seen = match key {
            b"descr" => std::mem::replace(&mut descr, s.string().map(|_| true)?),
            b"fortran_order" => {
                if !(s.word(b"True") || s.word(b"False")) {
                    return Err("fortran_order must be True or False".into());
                }
                std::mem::replace(&mut order, true)
            }
            b"shape" => shape.replace(s.tuple()?).is_some(),
            other => {
                return Err(format!(
                    "unexpected key {:?}",
                    String::from_utf8_lossy(other)
                ))
            }
        };
        if seen {
            return Err(format!("duplicate key {:?}", String::from_utf8_lossy(key)));
        }
        s.ws();
        if !s.eat(b',') {
            s.ws();
            s.expect(b'}')?;
            break;
        }
    }
    // numpy pads the header with spaces up to a newline.
    if !s.b[s.i..].iter().all(|c| c.is_ascii_whitespace()) {
        return Err("bytes after the header dict".into());
    }
    match (descr, order, shape) {
        (true, true, Some(shape)) => Ok(shape),
        _ => Err("the dict must hold descr, fortran_order and shape".into()),
    }
}

/// Cursor over NPY header bytes; every method advances or fails, so a scan is linear.
struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.b.get(self.i) == Some(&c);
        self.i += usize::from(hit);
        hit
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            return Ok(());
        }
        Err(match self.b.get(self.i) {
            Some(&got) => format!(
                "expected {:?} at byte {}, found {:?}",
                c as char, self.i, got as char
            ),
            None => format!("expected {:?}, found the end", c as char),
        })
    }

    fn word(&mut self, w: &[u8]) -> bool {
        let hit = self.b[self.i..].starts_with(w);
        if hit {
            self.i += w.len();
        }
        hit
    }

    /// A quoted string without escapes; returns its content.
    fn string(&mut self) -> Result<&'a [u8], String> {
        let Some(&q) = self.b.get(self.i).filter(|&&q| q == b'\'' || q == b'"') else {
            return Err(format!("expected a quoted string at byte {}", self.i));
        };
        let start = self.i + 1;
        let len = self.b[start..]
            .iter()
            .position(|&c| c == q || c == b'\\')
            .filter(|&l| self.b[start + l] == q)
            .ok_or("unterminated string, or one with escapes")?;
        self.i = start + len + 1;
        Ok(&self.b[start..start + len])
    }

    /// `(d0, d1, ...)` of non-negative integers, trailing comma allowed.
    fn tuple(&mut self) -> Result<Vec<u64>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            let start = self.i;
            while self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
                self.i += 1;
            }
            let digits = std::str::from_utf8(&self.b[start..self.i]).unwrap_or_default();
            let d = digits
                .parse::<u64>()
                .map_err(|_| format!("shape entry at byte {start} is not an integer below 2^64"))?;
            dims.push(d);
            if dims.len() > 32 {
                return Err("shape has more than 32 dimensions".into());
            }
            self.ws();
            if !self.eat(b',') {
                self.ws();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

thread_local! {
    /// The last NPY header this HTTP thread parsed, with its bytes: clients send the same
    /// header again and again, and npyz's parser (a Python-literal grammar) takes ~34 µs, a
    /// fifth of a small model's forward pass.
    static LAST_NPY_HEADER: std::cell::RefCell<Option<(Vec<u8>, npyz::NpyHeader)>> =
        const { std::cell::RefCell::new(None) };
}

/// Opens an NPY body whose header [`split_npy`] has checked, reusing the last parsed header
/// when the bytes are the same.
fn open_npy<'a>(head: &[u8], data: &'a [u8]) -> Result<npyz::NpyFile<&'a [u8]>, ApiError> {
    let cached = LAST_NPY_HEADER.with_borrow(|c| {
        c.as_ref()
            .filter(|(bytes, _)| bytes == head)
            .map(|(_, h)| h.clone())
    });
    let header = match cached {
        Some(h) => h,
        None => {
            let h =
                npyz::NpyHeader::from_reader(head).map_err(|e| bad(format!("invalid NPY: {e}")))?;
            LAST_NPY_HEADER.set(Some((head.to_vec(), h.clone())));
            h
        }
    };
    Ok(npyz::NpyFile::with_header(header, data))
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
    /// The model's `[C, H, W]` and the values per image, checked: every dimension positive and
    /// the product within `usize` (the spec's fields are public, so nothing else guarantees it).
    fn dims(&self) -> Result<([usize; 3], usize), ApiError> {
        let invalid = || {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the server's input shape {:?} is invalid", self.shape),
            )
        };
        let mut dims = [0usize; 3];
        for (d, &s) in dims.iter_mut().zip(&self.shape) {
            *d = usize::try_from(s)
                .ok()
                .filter(|&d| d > 0)
                .ok_or_else(invalid)?;
        }
        let per = dims
            .iter()
            .try_fold(1usize, |p, &d| p.checked_mul(d))
            .ok_or_else(invalid)?;
        Ok((dims, per))
    }

    /// Checks a `[C, H, W]` or `[N, C, H, W]` shape against the model's and the image limit;
    /// returns N and the number of values the images hold.
    fn count(&self, shape: &[u64]) -> Result<(usize, usize), ApiError> {
        let (want, per) = self.dims()?;
        let same = |s: &[u64]| s.iter().zip(&want).all(|(&a, &b)| a == b as u64);
        let n = match shape.len() {
            3 if same(shape) => 1,
            4 if same(&shape[1..]) => shape[0],
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
        let too_many = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{n} images in one request; at most {} are accepted",
                    self.max_images
                ),
            )
        };
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.max_images)
            .ok_or_else(too_many)?;
        let values = n.checked_mul(per).ok_or_else(too_many)?;
        Ok((n, values))
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
        let shape: Vec<u64> = nested.dims[..depth.min(nested.dims.len())]
            .iter()
            .map(|d| d.unwrap_or(0) as u64)
            .collect();
        let (n, values) = self.count(&shape)?;
        // The parser rejects ragged arrays as it goes; this catches any it let through, so a
        // body never reaches the model with a wrong number of values.
        if nested.values.len() != values {
            return Err(bad(format!(
                "images hold {} numbers; shape {shape:?} needs {values} (ragged array)",
                nested.values.len()
            )));
        }
        Ok(Images {
            pixels: nested.values,
            n,
        })
    }

    /// NPY array, C order, float32/float64 in `[0, 1]` or uint8 (divided by 255).
    fn npy(&self, body: &[u8]) -> Result<Images, ApiError> {
        let NpyParts { head, shape, data } = split_npy(body)?;
        // Checked before npyz sees the shape: it multiplies the dimensions unchecked.
        let (n, want) = self.count(&shape)?;
        let npy = open_npy(head, data)?;
        if npy.order() != npyz::Order::C {
            return Err(bad("NPY array is in Fortran order; send a C-ordered array"));
        }
        let npyz::DType::Plain(ts) = npy.dtype() else {
            return Err(bad("NPY dtype must be a plain float32, float64 or uint8"));
        };
        let read_err = |e: std::io::Error| bad(format!("reading NPY data: {e}"));
        let pixels: Vec<f32> = match (ts.type_char(), ts.size_field()) {
            // The common body, little-endian float32, is converted in bulk: npyz reads element
            // by element (~60 µs for one CIFAR image, a third of a small model's forward).
            (npyz::TypeChar::Float, 4) if ts.endianness() == npyz::Endianness::Little => {
                let data = npy.into_inner();
                // `want` values fit in memory as f32 already (the body bound them), so 4x fits.
                if data.len() / 4 < want {
                    return Err(bad(format!(
                        "NPY data holds {} bytes; its shape needs {} float32 values",
                        data.len(),
                        want
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
        let ([c, h, w], per) = self.dims()?;
        let cannot = |e: image::ImageError| bad(format!("cannot decode the image: {e}"));
        let reader = || {
            image::ImageReader::new(std::io::Cursor::new(body))
                .with_guessed_format()
                .map_err(|e| bad(format!("cannot read the image: {e}")))
        };
        // The size comes from the header alone: a 420 KB PNG may declare 12000x12000 pixels
        // (400 MB decoded), so nothing is decoded before it matches the model.
        let (iw, ih) = reader()?.into_dimensions().map_err(cannot)?;
        if iw as usize != w || ih as usize != h {
            return Err(bad(format!(
                "image is {iw}x{ih} (width x height); the model expects {w}x{h}"
            )));
        }
        // And the decoder may not exceed it either: 16-bit RGBA is the widest it produces.
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(iw);
        limits.max_image_height = Some(ih);
        limits.max_alloc = Some((per as u64).saturating_mul(8).saturating_add(1 << 20));
        let mut reader = reader()?;
        reader.limits(limits);
        let img = reader.decode().map_err(cannot)?;
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
        let hw = h * w;
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
        // An array already ended at this depth (`[[], 0]`, or empty rows before full ones).
        let after_array = n.dims.get(self.depth).is_some_and(Option::is_some);
        match n.leaf {
            None if after_array => {
                return Err(E::custom(format!(
                    "images{:?} is a number where earlier entries are arrays (ragged array)",
                    n.at
                )))
            }
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

    /// An NPY body with `header` as its header text (version 1).
    fn npy_with_header(header: &str, data: &[u8]) -> Vec<u8> {
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((header.len() as u16).to_le_bytes());
        b.extend(header.as_bytes());
        b.extend(data);
        b
    }

    #[test]
    fn deeply_nested_npy_header_is_refused_at_once() {
        // 128-byte bodies of nested lists or dicts: npyz's backtracking Python-literal parser
        // took 66 ms at 12 levels of `[` (x2.3 per level) and 3.8 s at 12 levels of `{` (x9).
        let prefix = "{'descr': '<f4', 'fortran_order': False, 'shape': ";
        let depth = (128 - 10 - prefix.len() - 2) / 2;
        for (open, close) in [("[", "]"), ("{", "")] {
            let header = format!("{prefix}{}{}}}\n", open.repeat(depth), close.repeat(depth));
            let mut body = npy_with_header(&header, &[]);
            body.resize(128, b' ');
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(SPEC.decode(Some("application/x-npy"), &body).map(|_| ()));
            });
            let err = rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("the header parse hung")
                .unwrap_err();
            assert_eq!(err.status, 400);
            assert!(
                err.message.contains("invalid NPY header"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn npy_headers_outside_the_plain_form_are_refused() {
        let data = [0u8; 16];
        let ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2, 2), }      \n";
        assert_eq!(
            status(SPEC.decode(Some("application/x-npy"), &npy_with_header(ok, &data))),
            200
        );
        for (header, why) in [
            (
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1, 1, 2, 2)}",
                "quoted string",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2, 2), 'x': 1}",
                "unexpected key",
            ),
            ("{'descr': '<f4', 'shape': (1, 1, 2, 2)}", "must hold"),
            (
                "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2, 2)}",
                "duplicate",
            ),
            (
                "{'descr': '<f4', 'fortran_order': 0, 'shape': (1, 1, 2, 2)}",
                "True or False",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, -1, 2, 2)}",
                "integer",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}",
                "integer",
            ),
            (
                "{'descr': '<\\f4', 'fortran_order': False, 'shape': (1, 1, 2, 2)}",
                "escapes",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2, 2)} x",
                "after the header",
            ),
        ] {
            let err = SPEC
                .decode(Some("application/x-npy"), &npy_with_header(header, &data))
                .unwrap_err();
            assert_eq!(err.status, 400, "{header}");
            assert!(err.message.contains(why), "{header}: {}", err.message);
        }
        // Header longer than the limit, or than the body; a version-2 length of 4 GiB.
        let long = format!("{ok:<5000}");
        let err = SPEC
            .decode(Some("application/x-npy"), &npy_with_header(&long, &data))
            .unwrap_err();
        assert!(err.message.contains("at most 4096"), "{}", err.message);
        let cut = &npy_with_header(ok, &[])[..40];
        let err = SPEC.decode(Some("application/x-npy"), cut).unwrap_err();
        assert!(err.message.contains("the body holds"), "{}", err.message);
        let mut v2 = b"\x93NUMPY\x02\x00\xff\xff\xff\xff".to_vec();
        v2.extend(ok.as_bytes());
        assert_eq!(status(SPEC.decode(Some("application/x-npy"), &v2)), 400);
    }

    #[test]
    fn npy_shapes_whose_products_overflow_are_refused_before_npyz() {
        // (2^32, 2^32, 1) wraps to 0 elements in an unchecked product; N = 2^63 images.
        for (shape, want) in [
            ("(4294967296, 4294967296, 1)", 400),
            ("(9223372036854775808, 1, 2, 2)", 413),
            ("(18446744073709551615, 1, 2, 2)", 413),
        ] {
            let header =
                format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}\n");
            let got = status(SPEC.decode(
                Some("application/x-npy"),
                &npy_with_header(&header, &[0; 16]),
            ));
            assert_eq!(got, want, "{shape}");
        }
    }

    #[test]
    fn npy_bodies_the_fuzz_harness_found_are_refused_quickly() {
        // The three findings of `tests/it/fuzz_readers.rs` (seed 7, 3,000 cases) against the
        // serve-side NPY reader, rebuilt byte for byte where it matters, for a CIFAR-like model.
        let spec = InputSpec {
            shape: [3, 8, 8],
            max_images: 64,
        };
        let prefix = "{'descr': '<f4', 'fortran_order': False,";
        // A 118-byte header that nests `{` to its end, in a 5.8 KB body: npyz's parser hung.
        let nested = format!("{prefix}{}", "{".repeat(118 - prefix.len()));
        let mut nested = npy_with_header(&nested, &[]);
        nested.resize(5812, b' ');
        // Version 2, whose length field (bytes "v\0{'") declares 0x277b0076 = 662 MB of header
        // in a 3.8 KB body: it was allocated.
        let mut v2 = b"\x93NUMPY\x02\x00v\x00{'descr': '<f4', ".to_vec();
        v2.resize(3794, b' ');
        // Shape (i64::MAX, 3, 8, 8): npyz multiplied it unchecked and panicked.
        let huge = format!("{prefix} 'shape': (9223372036854775807, 3, 8, 8, ), }}");
        let mut huge = npy_with_header(&huge, &[]);
        huge.resize(2252, b' ');
        for (body, want, says) in [
            (nested, 400, "invalid NPY header"),
            (v2, 400, "at most 4096"),
            (huge, 413, "at most 64 are accepted"),
        ] {
            let start = std::time::Instant::now();
            let err = spec.decode(Some("application/x-npy"), &body).unwrap_err();
            assert!(start.elapsed() < std::time::Duration::from_secs(1));
            assert_eq!(err.status, want, "{}", err.message);
            assert!(err.message.contains(says), "{}", err.message);
        }
    }

    #[test]
    fn json_rows_of_empty_arrays_before_numbers_are_ragged() {
        // The first row holds empty arrays where the others hold numbers: decoded to 2 values
        // for a 4-value image, the model worker panicked on the view.
        for body in [
            &br#"{"images": [[[[], []], [0.5, 0.5]]]}"#[..],
            br#"{"images": [[[[[], []], [0.5, 0.5]]]]}"#,
            br#"{"images": [[[[], [0.5, 0.5]], [0.5, 0.5]]]}"#,
            br#"{"images": [[[], [0.5, 0.5]]]}"#,
        ] {
            let err = SPEC.decode(Some("application/json"), body).unwrap_err();
            assert_eq!(err.status, 400, "{}", String::from_utf8_lossy(body));
            assert!(err.message.contains("ragged"), "{}", err.message);
        }
    }

    #[test]
    fn an_invalid_spec_is_an_error_not_a_panic() {
        for shape in [[0, 2, 2], [-1, 2, 2], [i64::MAX, i64::MAX, 2]] {
            let spec = InputSpec {
                shape,
                max_images: usize::MAX,
            };
            let body = br#"{"images": [[[0, 0], [0, 0]]]}"#;
            assert_eq!(status(spec.decode(Some("application/json"), body)), 500);
            let npy_body = npy("<f4", [0f32; 4]);
            assert_eq!(
                status(spec.decode(Some("application/x-npy"), &npy_body)),
                500
            );
        }
    }

    /// A PNG whose IHDR declares `width` x `height` 1-bit grey pixels, with `idat` as its data.
    fn png_declaring(width: u32, height: u32, idat: &[u8]) -> Vec<u8> {
        let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
            out.extend((data.len() as u32).to_be_bytes());
            let mut crc = flate2::Crc::new();
            crc.update(kind);
            crc.update(data);
            out.extend(kind);
            out.extend(data);
            out.extend(crc.sum().to_be_bytes());
        };
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend(width.to_be_bytes());
        ihdr.extend(height.to_be_bytes());
        ihdr.extend([1, 0, 0, 0, 0]); // 1 bit, grey, deflate, adaptive filter, no interlace
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IDAT", idat);
        chunk(&mut png, b"IEND", &[]);
        png
    }

    #[test]
    fn a_png_declaring_a_huge_size_is_refused_before_decoding() {
        let spec = InputSpec {
            shape: [1, 2, 2],
            max_images: 1,
        };
        // Garbage pixel data: refused by the size in the header, never decoded.
        let err = spec
            .decode(Some("image/png"), &png_declaring(12000, 12000, b"not zlib"))
            .unwrap_err();
        assert_eq!(err.status, 400);
        assert!(
            err.message.contains("image is 12000x12000"),
            "{}",
            err.message
        );
        // A valid one: 18 MB of zero rows deflate to a few KB, 144 MB once decoded to bytes.
        let row = 1 + 12000 / 8;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut z, &vec![0u8; row * 12000]).unwrap();
        let png = png_declaring(12000, 12000, &z.finish().unwrap());
        assert!(png.len() < 420 << 10, "{}", png.len());
        let t = std::time::Instant::now();
        let err = spec.decode(Some("image/png"), &png).unwrap_err();
        assert!(
            err.message.contains("image is 12000x12000"),
            "{}",
            err.message
        );
        assert!(t.elapsed().as_millis() < 1000, "{:?}", t.elapsed());
        // The same header at the model's size decodes.
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut z, &[0, 0b0100_0000, 0, 0b1000_0000]).unwrap();
        let im = spec
            .decode(
                Some("image/png"),
                &png_declaring(2, 2, &z.finish().unwrap()),
            )
            .unwrap();
        assert_eq!(im.pixels, vec![0.0, 1.0, 1.0, 0.0]);
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
