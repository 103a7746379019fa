//! Protocol conversion at the edge: OIP infer bodies that are not JSON
//! become the worker's tensors here, so model code sees one shape whatever
//! the client sent.
//!
//! - `image/jpeg`, `image/png`: decoded, resized and normalised into the
//!   FP32 `[1, 3, H, W]` input the model declares (H and W from its
//!   metadata), with the ImageNet mean and deviation torchvision models
//!   expect. The declared pixel count is checked before any pixel is decoded.
//! - `application/x-protobuf`: the public `infergate.v1.InferRequest`
//!   message, checked like JSON tensors.
//! - `application/octet-stream`: the body as one BYTES element.

use std::io::Cursor;

use bytes::Bytes;
use prost::Message;

use crate::error::GatewayError;
use crate::proto::{InferItem, InferRequest, ModelInfo, Tensor};

/// Channel means and deviations of ImageNet (RGB, on 0..1 values).
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The body kinds an OIP infer request may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Image,
    Protobuf,
    Raw,
}

impl BodyKind {
    /// From a `Content-Type`; `None` for anything else, and for none at all
    /// (a browser sends a body without one cross-origin, unasked).
    pub fn of(content_type: Option<&str>) -> Option<Self> {
        let ct = content_type?;
        let mime = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        Some(match mime.as_str() {
            "image/jpeg" | "image/png" => Self::Image,
            "application/x-protobuf" | "application/protobuf" => Self::Protobuf,
            "application/octet-stream" => Self::Raw,
            m if m == "application/json" || m.ends_with("+json") => Self::Json,
            _ => return None,
        })
    }

    /// An OIP infer body's kind from its request's headers. A body without
    /// a type is JSON, as Triton reads it (`tritonclient` sends none), but
    /// only from a client that is not a web page: a browser names the
    /// page's origin (`Origin`, `Sec-Fetch-Site`) on every cross-origin POST,
    /// and an untyped body is what a page can send there unasked.
    ///
    /// A body with OIP's `Inference-Header-Content-Length` is JSON (a
    /// header, then tensors' bytes) whatever its type says: a page cannot
    /// send that header without asking first.
    pub fn of_infer(headers: &http::HeaderMap) -> Option<Self> {
        if headers.contains_key(super::json::HEADER_LENGTH) {
            return Some(Self::Json);
        }
        match headers.get(http::header::CONTENT_TYPE) {
            Some(ct) => Self::of(Some(ct.to_str().unwrap_or("?"))),
            None => {
                let from_a_page = headers.contains_key(http::header::ORIGIN) || headers.contains_key("sec-fetch-site");
                (!from_a_page).then_some(Self::Json)
            }
        }
    }
}

/// The image input a model declares: an FP32 input shaped `[1|-1, 3, H, W]`.
pub fn image_input(info: &ModelInfo) -> Result<(&str, u32, u32), GatewayError> {
    info.inputs
        .iter()
        .find_map(|s| match s.shape.as_slice() {
            [n, 3, h, w] if s.datatype == "FP32" && (*n == 1 || *n == -1) && *h > 0 && *w > 0 => {
                Some((s.name.as_str(), u32::try_from(*h).ok()?, u32::try_from(*w).ok()?))
            }
            _ => None,
        })
        .ok_or_else(|| GatewayError::UnsupportedOperation {
            model: info.name.clone(),
            operation: "image input (it declares no FP32 input shaped [1, 3, H, W])",
        })
}

/// Decode a JPEG or PNG into the `[1, 3, h, w]` tensor `name`. An image
/// that declares more than `max_pixels` pixels is refused from its header.
pub fn image_tensor(bytes: &[u8], name: &str, h: u32, w: u32, max: ImageBounds) -> Result<Tensor, GatewayError> {
    let bad = |e: &dyn std::fmt::Display| GatewayError::invalid("body", format!("cannot decode the image: {e}"));
    let reader = image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| bad(&e))?;
    let declared = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(&e))?
        .into_dimensions()
        .map_err(|e| bad(&e))?;
    let pixels = u64::from(declared.0) * u64::from(declared.1);
    if pixels > max.pixels {
        return Err(GatewayError::ImageTooLarge { width: declared.0, height: declared.1, max_pixels: max.pixels });
    }
    let mut reader = reader;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(declared.0);
    limits.max_image_height = Some(declared.1);
    // Pixels alone do not bound memory: 16-bit RGBA takes 8 bytes a pixel.
    limits.max_alloc = Some(max.bytes);
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => {
            GatewayError::ImageTooHeavy { width: declared.0, height: declared.1, max_bytes: max.bytes }
        }
        e => bad(&e),
    })?;
    // In place when it is already 8-bit RGB. A triangle (bilinear) filter,
    // with SIMD: the resize was a third of a frame's time in the gateway.
    let mut rgb = image::RgbImage::new(w, h);
    fast_image_resize::Resizer::new()
        .resize(
            &decoded.into_rgb8(),
            &mut rgb,
            &fast_image_resize::ResizeOptions::new()
                .resize_alg(fast_image_resize::ResizeAlg::Convolution(fast_image_resize::FilterType::Bilinear)),
        )
        .map_err(|e| bad(&e))?;
    let plane = (h as usize) * (w as usize);
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (f32::from(px[c]) / 255.0 - MEAN[c]) / STD[c];
        }
    }
    Ok(Tensor {
        name: name.to_owned(),
        datatype: "FP32".into(),
        shape: vec![1, 3, i64::from(h), i64::from(w)],
        fp32_contents: data,
        ..Default::default()
    })
}

/// How big an image may be: declared pixels (checked from the header,
/// before decoding) and bytes the decoder may allocate.
#[derive(Debug, Clone, Copy)]
pub struct ImageBounds {
    pub pixels: u64,
    pub bytes: u64,
}

/// The body as one BYTES element of the model's first input (or `input`).
pub fn raw_tensor(body: Bytes, info: &ModelInfo) -> Tensor {
    let name = info.inputs.first().map_or("input", |s| s.name.as_str());
    Tensor {
        name: name.to_owned(),
        datatype: "BYTES".into(),
        shape: vec![1],
        bytes_contents: vec![body.to_vec()],
        ..Default::default()
    }
}

/// An `infergate.v1.InferRequest` message, its tensors checked.
pub fn protobuf_item(body: &[u8], model: &str) -> Result<InferItem, GatewayError> {
    let mut r = InferRequest::decode(body)
        .map_err(|e| GatewayError::invalid("body", format!("not an infergate.v1.InferRequest: {e}")))?;
    if !r.model.is_empty() && r.model != model {
        return Err(GatewayError::invalid("model", format!("the message names {:?}, the path {model:?}", r.model)));
    }
    if r.inputs.is_empty() {
        return Err(GatewayError::invalid("inputs", "at least one input tensor is required"));
    }
    for (i, t) in r.inputs.iter_mut().enumerate() {
        check_tensor(t, &format!("inputs[{i}]"))?;
    }
    Ok(InferItem { id: r.id, inputs: r.inputs, outputs: r.outputs, parameters: r.parameters })
}

/// A proto tensor is well formed: a known datatype, its values in the
/// field that datatype uses (and no other) or in `raw_contents` (read into
/// that field here), as many as its shape says.
pub fn check_tensor(t: &mut Tensor, field: &str) -> Result<(), GatewayError> {
    crate::tensor::from_raw(t).map_err(|why| GatewayError::invalid(format!("{field}.raw_contents"), why))?;
    let filled = [
        ("BOOL", t.bool_contents.len()),
        ("INT", t.int64_contents.len()),
        ("UINT", t.uint64_contents.len()),
        ("FP32", t.fp32_contents.len()),
        ("FP64", t.fp64_contents.len()),
        ("BYTES", t.bytes_contents.len()),
    ];
    let field_of = match t.datatype.as_str() {
        "BOOL" => "BOOL",
        "INT8" | "INT16" | "INT32" | "INT64" => "INT",
        "UINT8" | "UINT16" | "UINT32" | "UINT64" => "UINT",
        "FP16" | "FP32" => "FP32",
        "FP64" => "FP64",
        "BYTES" => "BYTES",
        other => return Err(GatewayError::invalid(format!("{field}.datatype"), format!("unknown datatype {other:?}"))),
    };
    let expected = super::json::element_count(&t.shape, field)?;
    let mut count = 0;
    for (kind, n) in filled {
        if kind == field_of {
            count = n;
        } else if n > 0 {
            return Err(GatewayError::invalid(
                format!("{field}.contents"),
                format!("{} values must be in the contents field of their datatype", t.datatype),
            ));
        }
    }
    if count as u64 != expected {
        return Err(GatewayError::invalid(
            format!("{field}.data"),
            format!("shape {:?} needs {expected} values, got {count}", t.shape),
        ));
    }
    // Narrow integers travel in 64-bit fields: each value must fit its type.
    let bits = match t.datatype.as_str() {
        "INT8" | "UINT8" => 8,
        "INT16" | "UINT16" => 16,
        "INT32" | "UINT32" => 32,
        _ => return Ok(()),
    };
    let unfit = if t.datatype.starts_with('U') {
        t.uint64_contents.iter().position(|v| *v >= 1 << bits)
    } else {
        t.int64_contents.iter().position(|v| !(-(1i64 << (bits - 1))..1i64 << (bits - 1)).contains(v))
    };
    match unfit {
        Some(i) => Err(GatewayError::invalid(format!("{field}.data[{i}]"), format!("out of range for {}", t.datatype))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TensorSpec;

    fn model(inputs: Vec<TensorSpec>) -> ModelInfo {
        ModelInfo { name: "m".into(), inputs, ..Default::default() }
    }

    fn spec(name: &str, datatype: &str, shape: &[i64]) -> TensorSpec {
        TensorSpec { name: name.into(), datatype: datatype.into(), shape: shape.to_vec() }
    }

    fn png(w: u32, h: u32, px: [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb(px));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn content_types_pick_the_body_kind() {
        assert_eq!(BodyKind::of(None), None);
        assert_eq!(BodyKind::of(Some("application/json; charset=utf-8")), Some(BodyKind::Json));
        assert_eq!(BodyKind::of(Some("IMAGE/PNG")), Some(BodyKind::Image));
        assert_eq!(BodyKind::of(Some("image/jpeg")), Some(BodyKind::Image));
        assert_eq!(BodyKind::of(Some("application/x-protobuf")), Some(BodyKind::Protobuf));
        assert_eq!(BodyKind::of(Some("application/octet-stream")), Some(BodyKind::Raw));
        assert_eq!(BodyKind::of(Some("text/plain")), None);
        assert_eq!(BodyKind::of(Some("image/gif")), None);
    }

    #[test]
    fn infer_bodies_are_json_untyped_or_with_the_binary_header_unless_a_page_sent_them() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), http::HeaderValue::from_static(v))).collect()
        };
        assert_eq!(BodyKind::of_infer(&headers(&[])), Some(BodyKind::Json));
        assert_eq!(BodyKind::of_infer(&headers(&[("origin", "https://a.example")])), None);
        assert_eq!(BodyKind::of_infer(&headers(&[("content-type", "text/plain")])), None);
        let binary = [("content-type", "application/octet-stream"), ("inference-header-content-length", "10")];
        assert_eq!(BodyKind::of_infer(&headers(&binary)), Some(BodyKind::Json));
        assert_eq!(BodyKind::of_infer(&headers(&[("content-type", "image/png")])), Some(BodyKind::Image));
    }

    #[test]
    fn the_image_input_comes_from_the_metadata() {
        let m = model(vec![spec("ids", "INT64", &[-1]), spec("pixels", "FP32", &[-1, 3, 32, 48])]);
        assert_eq!(image_input(&m).unwrap(), ("pixels", 32, 48));
        assert!(image_input(&model(vec![spec("x", "FP32", &[1, 1, 32, 32])])).is_err(), "one channel");
        assert!(image_input(&model(vec![spec("x", "FP32", &[1, 3, -1, 32])])).is_err(), "no fixed size");
    }

    #[test]
    fn an_image_becomes_a_normalised_chw_tensor_of_the_declared_size() {
        let t = image_tensor(&png(100, 50, [255, 0, 128]), "pixels", 16, 24, bounds(1 << 20)).unwrap();
        assert_eq!(t.shape, [1, 3, 16, 24]);
        assert_eq!(t.fp32_contents.len(), 3 * 16 * 24);
        let plane = 16 * 24;
        let expect = |c: usize, v: f32| (v / 255.0 - MEAN[c]) / STD[c];
        assert!((t.fp32_contents[0] - expect(0, 255.0)).abs() < 1e-5, "red plane first");
        assert!((t.fp32_contents[plane] - expect(1, 0.0)).abs() < 1e-5);
        assert!((t.fp32_contents[2 * plane + 5] - expect(2, 128.0)).abs() < 1e-5);
    }

    /// CRC-32 (IEEE), as PNG chunks use.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for b in bytes {
            crc ^= u32::from(*b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn a_decompression_bomb_is_refused_from_its_header() {
        // A 1x1 PNG whose header claims 100000 x 100000 pixels.
        let mut bomb = png(1, 1, [0, 0, 0]);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]); // over the chunk type and data, so the header is valid
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = image_tensor(&bomb, "x", 8, 8, bounds(1 << 24)).unwrap_err();
        assert!(matches!(err, GatewayError::ImageTooLarge { width: 100_000, height: 100_000, .. }), "{err:?}");
        assert_eq!(err.http_status(), http::StatusCode::PAYLOAD_TOO_LARGE);
    }

    fn bounds(pixels: u64) -> ImageBounds {
        ImageBounds { pixels, bytes: 1 << 28 }
    }

    #[test]
    fn an_image_whose_decoding_needs_more_bytes_than_allowed_is_413() {
        // 16-bit RGBA, 600 x 600: few pixels, but 2.9 MB to decode.
        let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(600, 600, image::Rgba([1, 2, 3, 4]));
        let mut body = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut body), image::ImageFormat::Png).unwrap();
        let tight = ImageBounds { pixels: 1 << 24, bytes: 1 << 20 };
        let err = image_tensor(&body, "x", 8, 8, tight).unwrap_err();
        assert!(matches!(err, GatewayError::ImageTooHeavy { width: 600, height: 600, .. }), "{err:?}");
        assert_eq!(err.http_status(), http::StatusCode::PAYLOAD_TOO_LARGE);
        assert!(image_tensor(&body, "x", 8, 8, bounds(1 << 24)).is_ok(), "within bounds it decodes");
    }

    #[test]
    fn corrupt_images_are_the_callers_error() {
        for body in [b"not an image".to_vec(), png(4, 4, [1, 2, 3])[..40].to_vec()] {
            let err = image_tensor(&body, "x", 8, 8, bounds(1 << 24)).unwrap_err();
            assert_eq!(err.http_status(), http::StatusCode::BAD_REQUEST, "{err:?}");
        }
    }

    #[test]
    fn protobuf_bodies_are_checked_like_json() {
        let t = |datatype: &str, shape: Vec<i64>, fp32: Vec<f32>| Tensor {
            name: "x".into(),
            datatype: datatype.into(),
            shape,
            fp32_contents: fp32,
            ..Default::default()
        };
        let ok =
            InferRequest { model: "m".into(), inputs: vec![t("FP32", vec![2], vec![1.0, 2.0])], ..Default::default() };
        let item = protobuf_item(&ok.encode_to_vec(), "m").unwrap();
        assert_eq!(item.inputs[0].fp32_contents, [1.0, 2.0]);
        let wrong = |r: InferRequest| protobuf_item(&r.encode_to_vec(), "m").unwrap_err();
        let short = InferRequest { inputs: vec![t("FP32", vec![3], vec![1.0])], ..Default::default() };
        assert!(wrong(short).to_string().contains("needs 3 values"));
        let misfiled = InferRequest { inputs: vec![t("INT32", vec![1], vec![1.0])], ..Default::default() };
        assert!(wrong(misfiled).to_string().contains("contents field"));
        let other =
            InferRequest { model: "n".into(), inputs: vec![t("FP32", vec![1], vec![1.0])], ..Default::default() };
        assert!(wrong(other).to_string().contains("the path"));
        assert!(protobuf_item(b"\xff\xff\xff", "m").is_err());
    }

    #[test]
    fn raw_tensors_from_clients_are_read_into_typed_ones_and_checked() {
        let raw = |datatype: &str, shape: Vec<i64>, raw: Vec<u8>| InferRequest {
            inputs: vec![Tensor {
                name: "x".into(),
                datatype: datatype.into(),
                shape,
                raw_contents: raw,
                ..Default::default()
            }],
            ..Default::default()
        };
        let bytes = [1.5f32.to_le_bytes(), (-2f32).to_le_bytes()].concat();
        let item = protobuf_item(&raw("FP32", vec![2], bytes.clone()).encode_to_vec(), "m").unwrap();
        assert_eq!((item.inputs[0].fp32_contents.as_slice(), item.inputs[0].raw_contents.len()), (&[1.5, -2.0][..], 0));
        let wrong = |r: InferRequest| protobuf_item(&r.encode_to_vec(), "m").unwrap_err();
        let short = wrong(raw("FP32", vec![3], bytes));
        assert!(short.to_string().contains("needs 3 values, got 2"), "{short}");
        let ragged = wrong(raw("INT16", vec![1], vec![1, 2, 3]));
        assert!(format!("{ragged:?}").contains("inputs[0].raw_contents"), "{ragged:?}");
        assert!(ragged.to_string().contains("not a whole number of 2-byte INT16 values"), "{ragged}");
        assert_eq!(ragged.http_status(), http::StatusCode::BAD_REQUEST);
    }
}
