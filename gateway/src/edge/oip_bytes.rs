//! The Open Inference Protocol's binary form of a tensor, shared by its
//! binary extension over REST (`binary_data_size`) and by gRPC's
//! `raw_input_contents` / `raw_output_contents`: numbers little endian in
//! the datatype's own width (BOOL one byte, FP16 two); a BYTES element is a
//! 4-byte little-endian length and then its bytes. Inside the gateway a
//! tensor is typed; sizes are checked against shape × datatype before a
//! value is copied, and nothing is reserved beyond the bytes given.

use crate::error::GatewayError;
use crate::proto::Tensor;

/// Bytes per value in binary form; `None` for BYTES (length-prefixed) and
/// unknown datatypes.
fn width(datatype: &str) -> Option<usize> {
    match datatype {
        "FP16" => Some(2),
        other => crate::tensor::raw_width(other),
    }
}

/// Decode an input from `bytes`, its binary data: `t` carries its name,
/// datatype and shape, which holds `count` values. `field` names the input
/// in errors, `data_field` where its bytes came from; errors say what the
/// shape needs against what was sent.
pub fn decode(mut t: Tensor, count: u64, bytes: &[u8], field: &str, data_field: &str) -> Result<Tensor, GatewayError> {
    let size_field = || data_field.to_owned();
    if t.datatype == "BYTES" {
        t.bytes_contents = elements(bytes, count).map_err(|why| {
            let needs = format!("input {:?}: shape {:?} needs {count} BYTES elements", t.name, t.shape);
            GatewayError::invalid(size_field(), format!("{needs}; {why}"))
        })?;
        return Ok(t);
    }
    let Some(width) = width(&t.datatype) else {
        return Err(GatewayError::invalid(format!("{field}.datatype"), format!("unknown datatype {:?}", t.datatype)));
    };
    let needed = count.saturating_mul(width as u64);
    if needed != bytes.len() as u64 {
        let (name, shape, datatype, got) = (&t.name, &t.shape, &t.datatype, bytes.len());
        return Err(GatewayError::invalid(
            size_field(),
            format!("input {name:?}: shape {shape:?} of {datatype} needs {needed} bytes, {got} were sent"),
        ));
    }
    if t.datatype == "FP16" {
        t.fp32_contents = bytes.as_chunks::<2>().0.iter().map(|b| half::f16::from_le_bytes(*b).to_f32()).collect();
    } else {
        t.raw_contents = bytes.to_vec();
        crate::tensor::from_raw(&mut t).map_err(|e| GatewayError::invalid(size_field(), e))?;
    }
    Ok(t)
}

/// `count` length-prefixed elements filling `bytes` exactly.
fn elements(mut bytes: &[u8], count: u64) -> Result<Vec<Vec<u8>>, String> {
    // Each element takes at least its 4-byte length.
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(bytes.len() / 4));
    while let Some((length, rest)) = bytes.split_first_chunk::<4>() {
        let length = u32::from_le_bytes(*length) as usize;
        if length > rest.len() {
            return Err(format!("element {} says {length} bytes, {} are left", out.len(), rest.len()));
        }
        let (element, rest) = rest.split_at(length);
        out.push(element.to_vec());
        bytes = rest;
        if out.len() as u64 > count {
            return Err("the data holds more".to_owned());
        }
    }
    if !bytes.is_empty() {
        return Err(format!("{} bytes left over, too few for an element's length", bytes.len()));
    }
    if out.len() as u64 != count {
        return Err(format!("the data holds {}", out.len()));
    }
    Ok(out)
}

/// Output `t` in binary form; `None` when its values do not fit its
/// datatype (the caller says so).
pub fn encode(mut t: Tensor) -> Option<Vec<u8>> {
    match t.datatype.as_str() {
        "BYTES" => {
            let size = t.bytes_contents.iter().map(|b| 4 + b.len()).sum();
            let mut out = Vec::with_capacity(size);
            for b in &t.bytes_contents {
                out.extend_from_slice(&u32::try_from(b.len()).ok()?.to_le_bytes());
                out.extend_from_slice(b);
            }
            Some(out)
        }
        "FP16" => Some(t.fp32_contents.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
        _ => {
            crate::tensor::into_raw(&mut t);
            let empty = t.bool_contents.is_empty()
                && t.int64_contents.is_empty()
                && t.uint64_contents.is_empty()
                && t.fp32_contents.is_empty()
                && t.fp64_contents.is_empty();
            (empty && crate::tensor::raw_width(&t.datatype).is_some()).then_some(t.raw_contents)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(shape: &[i64], datatype: &str) -> Tensor {
        Tensor { name: "x".into(), datatype: datatype.into(), shape: shape.to_vec(), ..Default::default() }
    }

    fn decode(t: Tensor, bytes: &[u8]) -> Result<Tensor, GatewayError> {
        let count = t.shape.iter().product::<i64>().unsigned_abs();
        super::decode(t, count, bytes, "inputs[0]", "inputs[0].parameters.binary_data_size")
    }

    #[test]
    fn every_datatype_decodes_from_its_binary_form_and_encodes_back() {
        let cases: [(&str, Vec<u8>); 5] = [
            ("FP32", [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect()),
            ("INT64", [i64::MIN, 7].iter().flat_map(|v| v.to_le_bytes()).collect()),
            ("UINT8", vec![0, 255]),
            ("BOOL", vec![1, 0]),
            (
                "FP16",
                [half::f16::from_f32(0.5), half::f16::from_f32(-3.0)].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ];
        for (datatype, bytes) in cases {
            let t = decode(input(&[2], datatype), &bytes).unwrap();
            assert!(t.raw_contents.is_empty(), "{datatype}: typed inside the gateway");
            assert_eq!(encode(t).unwrap(), bytes, "{datatype}");
        }
        let t = decode(input(&[2], "FP16"), &[0, 0x38, 0, 0xc2]).unwrap();
        assert_eq!(t.fp32_contents, vec![0.5, -3.0]);
        let mut words = Vec::new();
        for w in [&b"caf\xc3\xa9"[..], b"", b"\x00\xff"] {
            words.extend_from_slice(&u32::try_from(w.len()).unwrap().to_le_bytes());
            words.extend_from_slice(w);
        }
        let t = decode(input(&[3], "BYTES"), &words).unwrap();
        assert_eq!(t.bytes_contents, vec![b"caf\xc3\xa9".to_vec(), Vec::new(), b"\x00\xff".to_vec()]);
        assert_eq!(encode(t).unwrap(), words);
    }

    #[test]
    fn sizes_that_disagree_with_the_shape_are_refused_with_the_input_named() {
        let detail = |e: GatewayError| e.problem(None).detail;
        let e = decode(input(&[2, 2], "INT32"), &[0; 12]).unwrap_err();
        assert!(detail(e).contains("input \"x\": shape [2, 2] of INT32 needs 16 bytes, 12 were sent"));
        let e = decode(input(&[2], "BYTES"), &[1, 0, 0, 0, b'a']).unwrap_err();
        assert!(detail(e).contains("needs 2 BYTES elements; the data holds 1"), "{}", "");
        let e = decode(input(&[1], "BYTES"), &[1, 0, 0, 0, b'a', 0, 0]).unwrap_err();
        assert!(detail(e).contains("2 bytes left over"));
        // A declared shape far beyond the data reserves nothing for it.
        let e = decode(input(&[268_435_456], "BYTES"), &[0, 0, 0, 0]).unwrap_err();
        assert!(detail(e).contains("the data holds 1"));
        let e = decode(input(&[1], "FP8"), &[0]).unwrap_err();
        assert_eq!(e.problem(None).field.as_deref(), Some("inputs[0].datatype"));
    }
}
