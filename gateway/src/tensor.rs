//! A tensor's raw form, `Tensor.raw_contents`: its values as one byte
//! string, each in its datatype's own width, little endian. Inside the
//! gateway a tensor is always typed (`fp32_contents`, ...): clients' and
//! workers' raw tensors are read into typed ones where they come in, and
//! typed ones are written raw only on their way to a worker that says it
//! reads raw ([`into_raw`]). A Python worker turns raw bytes into an array
//! with one copy, where typed contents cost it a Python object per value
//! (~230 ms of its event loop for a million FP32 values).

use crate::proto::Tensor;

/// Bytes per value of `datatype` in raw form; `None` where the datatype has
/// no raw form here (FP16, BYTES, unknown).
pub fn raw_width(datatype: &str) -> Option<usize> {
    Some(match datatype {
        "BOOL" | "INT8" | "UINT8" => 1,
        "INT16" | "UINT16" => 2,
        "INT32" | "UINT32" | "FP32" => 4,
        "INT64" | "UINT64" | "FP64" => 8,
        _ => return None,
    })
}

/// Values (or bytes) `t` holds, to judge the work of converting or
/// writing it.
pub fn size(t: &Tensor) -> usize {
    t.bool_contents.len()
        + t.int64_contents.len()
        + t.uint64_contents.len()
        + t.fp32_contents.len()
        + t.fp64_contents.len()
        + t.bytes_contents.iter().map(Vec::len).sum::<usize>()
        + t.raw_contents.len() / 4
}

/// Move `t`'s typed values into `raw_contents`. A tensor without a raw form,
/// already raw, or with a value its datatype's width cannot hold (a client
/// error the edge reports) is left as it is.
pub fn into_raw(t: &mut Tensor) {
    if !t.raw_contents.is_empty() {
        return;
    }
    let ints = &t.int64_contents;
    let uints = &t.uint64_contents;
    let raw = match t.datatype.as_str() {
        "BOOL" => Some(t.bool_contents.iter().map(|b| u8::from(*b)).collect()),
        "INT8" => pack(ints, |v| i8::try_from(v).ok().map(i8::to_le_bytes)),
        "INT16" => pack(ints, |v| i16::try_from(v).ok().map(i16::to_le_bytes)),
        "INT32" => pack(ints, |v| i32::try_from(v).ok().map(i32::to_le_bytes)),
        "INT64" => pack(ints, |v| Some(v.to_le_bytes())),
        "UINT8" => pack(uints, |v| u8::try_from(v).ok().map(u8::to_le_bytes)),
        "UINT16" => pack(uints, |v| u16::try_from(v).ok().map(u16::to_le_bytes)),
        "UINT32" => pack(uints, |v| u32::try_from(v).ok().map(u32::to_le_bytes)),
        "UINT64" => pack(uints, |v| Some(v.to_le_bytes())),
        "FP32" => pack(&t.fp32_contents, |v| Some(v.to_le_bytes())),
        "FP64" => pack(&t.fp64_contents, |v| Some(v.to_le_bytes())),
        _ => None,
    };
    let Some(raw) = raw else { return };
    t.bool_contents = Vec::new();
    t.int64_contents = Vec::new();
    t.uint64_contents = Vec::new();
    t.fp32_contents = Vec::new();
    t.fp64_contents = Vec::new();
    t.raw_contents = raw;
}

fn pack<T: Copy, const N: usize>(values: &[T], bytes: impl Fn(T) -> Option<[u8; N]>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * N);
    for v in values {
        out.extend_from_slice(&bytes(*v)?);
    }
    Some(out)
}

/// Read `t`'s `raw_contents`, if any, into its typed field. Errors say what
/// is wrong, for the sender: a datatype with no raw form, both forms given,
/// or a length that is not a whole number of values.
pub fn from_raw(t: &mut Tensor) -> Result<(), String> {
    if t.raw_contents.is_empty() {
        return Ok(());
    }
    let Some(width) = raw_width(&t.datatype) else {
        return Err(format!("{} values cannot be sent in raw_contents; use their typed field", t.datatype));
    };
    let typed = t.bool_contents.len()
        + t.int64_contents.len()
        + t.uint64_contents.len()
        + t.fp32_contents.len()
        + t.fp64_contents.len()
        + t.bytes_contents.len();
    if typed > 0 {
        return Err("raw_contents and a typed contents field are both filled".to_owned());
    }
    let raw = std::mem::take(&mut t.raw_contents);
    if !raw.len().is_multiple_of(width) {
        return Err(format!(
            "raw_contents holds {} bytes, not a whole number of {width}-byte {} values",
            raw.len(),
            t.datatype
        ));
    }
    match t.datatype.as_str() {
        "BOOL" => t.bool_contents = raw.iter().map(|b| *b != 0).collect(),
        "INT8" => t.int64_contents = unpack(&raw, |b| i64::from(i8::from_le_bytes(b))),
        "INT16" => t.int64_contents = unpack(&raw, |b| i64::from(i16::from_le_bytes(b))),
        "INT32" => t.int64_contents = unpack(&raw, |b| i64::from(i32::from_le_bytes(b))),
        "INT64" => t.int64_contents = unpack(&raw, i64::from_le_bytes),
        "UINT8" => t.uint64_contents = unpack(&raw, |b| u64::from(u8::from_le_bytes(b))),
        "UINT16" => t.uint64_contents = unpack(&raw, |b| u64::from(u16::from_le_bytes(b))),
        "UINT32" => t.uint64_contents = unpack(&raw, |b| u64::from(u32::from_le_bytes(b))),
        "UINT64" => t.uint64_contents = unpack(&raw, u64::from_le_bytes),
        "FP32" => t.fp32_contents = unpack(&raw, f32::from_le_bytes),
        _ => t.fp64_contents = unpack(&raw, f64::from_le_bytes),
    }
    Ok(())
}

/// `raw` (a whole number of `N`-byte values) read value by value.
fn unpack<T, const N: usize>(raw: &[u8], value: impl Fn([u8; N]) -> T) -> Vec<T> {
    raw.as_chunks::<N>().0.iter().map(|b| value(*b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(datatype: &str) -> Tensor {
        Tensor { name: "x".into(), datatype: datatype.into(), shape: vec![3], ..Default::default() }
    }

    #[test]
    fn every_numeric_datatype_goes_raw_and_back_unchanged() {
        type Fill = fn(&mut Tensor);
        let cases: [(&str, Fill, usize); 11] = [
            ("BOOL", |t| t.bool_contents = vec![true, false, true], 1),
            ("INT8", |t| t.int64_contents = vec![-128, 0, 127], 1),
            ("INT16", |t| t.int64_contents = vec![-32768, 1, 32767], 2),
            ("INT32", |t| t.int64_contents = vec![i64::from(i32::MIN), 2, i64::from(i32::MAX)], 4),
            ("INT64", |t| t.int64_contents = vec![i64::MIN, 3, i64::MAX], 8),
            ("UINT8", |t| t.uint64_contents = vec![0, 1, 255], 1),
            ("UINT16", |t| t.uint64_contents = vec![0, 1, 65535], 2),
            ("UINT32", |t| t.uint64_contents = vec![0, 1, u64::from(u32::MAX)], 4),
            ("UINT64", |t| t.uint64_contents = vec![0, 1, u64::MAX], 8),
            ("FP32", |t| t.fp32_contents = vec![-1.5, 0.0, f32::MAX], 4),
            ("FP64", |t| t.fp64_contents = vec![-1.5, 1e-300, f64::MAX], 8),
        ];
        for (datatype, fill, width) in cases {
            let mut typed = tensor(datatype);
            fill(&mut typed);
            let mut t = typed.clone();
            into_raw(&mut t);
            assert_eq!(t.raw_contents.len(), 3 * width, "{datatype}");
            assert_eq!(Some(width), raw_width(datatype));
            let mut only_raw = t.clone();
            only_raw.raw_contents = Vec::new();
            assert_eq!(only_raw, tensor(datatype), "{datatype}: typed field emptied");
            from_raw(&mut t).unwrap();
            assert_eq!(t, typed, "{datatype}");
        }
    }

    #[test]
    fn raw_bytes_are_little_endian_in_the_datatype_width() {
        let mut t = tensor("INT16");
        t.int64_contents = vec![1, -2, 0x0102];
        into_raw(&mut t);
        assert_eq!(t.raw_contents, [1, 0, 0xfe, 0xff, 2, 1]);
        let mut f = tensor("FP32");
        f.fp32_contents = vec![1.0];
        into_raw(&mut f);
        assert_eq!(f.raw_contents, [0, 0, 0x80, 0x3f]);
    }

    #[test]
    fn a_value_too_wide_for_its_datatype_stays_typed_for_the_edge_to_refuse() {
        let mut t = tensor("INT8");
        t.int64_contents = vec![1, 300, 2];
        let before = t.clone();
        into_raw(&mut t);
        assert_eq!(t, before);
        for datatype in ["FP16", "BYTES", "NOPE"] {
            let mut t = tensor(datatype);
            t.fp32_contents = vec![1.0];
            let before = t.clone();
            into_raw(&mut t);
            assert_eq!(t, before, "{datatype} has no raw form");
        }
    }

    #[test]
    fn malformed_raw_contents_are_refused_with_the_reason() {
        let mut odd = tensor("FP32");
        odd.raw_contents = vec![0; 7];
        assert!(from_raw(&mut odd).unwrap_err().contains("7 bytes, not a whole number of 4-byte FP32"));
        let mut both = tensor("FP64");
        both.raw_contents = vec![0; 8];
        both.fp64_contents = vec![1.0];
        assert!(from_raw(&mut both).unwrap_err().contains("both filled"));
        let mut text = tensor("BYTES");
        text.raw_contents = b"abc".to_vec();
        assert!(from_raw(&mut text).unwrap_err().contains("BYTES values cannot be sent in raw_contents"));
        let mut half = tensor("FP16");
        half.raw_contents = vec![0; 2];
        assert!(from_raw(&mut half).is_err());
        let mut none = tensor("FP32");
        from_raw(&mut none).unwrap();
        assert_eq!(none, tensor("FP32"));
    }
}
