//! A tensor model's declared inputs, enforced before any worker is touched:
//! a call with an input the model does not take, without one it needs, or
//! with the wrong datatype or shape is the caller's 400, named, not a
//! model's exception deep in its code.

use crate::error::GatewayError;
use crate::proto::{InferItem, TensorSpec};

/// Check `item` against what model `model` declares; a model that declares
/// no inputs takes anything.
pub fn check_inputs(model: &str, declared: &[TensorSpec], item: &InferItem) -> Result<(), GatewayError> {
    if declared.is_empty() {
        return Ok(());
    }
    for (i, input) in item.inputs.iter().enumerate() {
        let field = format!("inputs[{i}]");
        let Some(spec) = declared.iter().find(|s| s.name == input.name) else {
            let names: Vec<&str> = declared.iter().map(|s| s.name.as_str()).collect();
            return Err(GatewayError::invalid(
                field,
                format!("model {model:?} has no input {:?}; it takes {}", input.name, names.join(", ")),
            ));
        };
        if !spec.datatype.is_empty() && spec.datatype != input.datatype {
            return Err(GatewayError::invalid(
                field,
                format!("input {:?} is {}; model {model:?} takes {}", input.name, input.datatype, spec.datatype),
            ));
        }
        if !fits(&spec.shape, &input.shape) {
            return Err(GatewayError::invalid(
                field,
                format!(
                    "input {:?} has shape {:?}; model {model:?} takes {:?} (-1: any size)",
                    input.name, input.shape, spec.shape
                ),
            ));
        }
    }
    if let Some(missing) = declared.iter().find(|s| !item.inputs.iter().any(|t| t.name == s.name)) {
        return Err(GatewayError::invalid(
            "inputs",
            format!("model {model:?} needs input {:?} ({} {:?})", missing.name, missing.datatype, missing.shape),
        ));
    }
    Ok(())
}

/// Whether `shape` fits `declared`: as many dimensions, each equal or -1
/// (any size) in the declaration. No declared shape fits any.
fn fits(declared: &[i64], shape: &[i64]) -> bool {
    declared.is_empty()
        || (declared.len() == shape.len() && declared.iter().zip(shape).all(|(d, s)| *d == -1 || d == s))
}

#[cfg(test)]
mod tests {
    use super::check_inputs;
    use crate::error::GatewayError;
    use crate::proto::{InferItem, Tensor, TensorSpec};

    fn spec(name: &str, datatype: &str, shape: &[i64]) -> TensorSpec {
        TensorSpec { name: name.into(), datatype: datatype.into(), shape: shape.to_vec() }
    }

    fn item(inputs: &[(&str, &str, &[i64])]) -> InferItem {
        let tensor = |(name, datatype, shape): &(&str, &str, &[i64])| Tensor {
            name: (*name).into(),
            datatype: (*datatype).into(),
            shape: shape.to_vec(),
            ..Default::default()
        };
        InferItem { inputs: inputs.iter().map(tensor).collect(), ..Default::default() }
    }

    fn refused(r: Result<(), GatewayError>) -> (String, String) {
        match r {
            Err(GatewayError::InvalidRequest { field, detail }) => (field.unwrap_or_default(), detail),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn inputs_must_be_the_declared_ones_of_their_datatype_and_shape() {
        let declared = [spec("image", "FP32", &[-1, 3, 32, 32]), spec("scale", "FP32", &[1])];
        let ok = item(&[("image", "FP32", &[2, 3, 32, 32]), ("scale", "FP32", &[1])]);
        assert!(check_inputs("cnn", &declared, &ok).is_ok());

        let (field, detail) =
            refused(check_inputs("cnn", &declared, &item(&[("scale", "FP32", &[1]), ("img", "FP32", &[1])])));
        assert_eq!(field, "inputs[1]");
        assert_eq!(detail, "model \"cnn\" has no input \"img\"; it takes image, scale");

        let (_, detail) = refused(check_inputs("cnn", &declared, &item(&[("image", "FP64", &[1, 3, 32, 32])])));
        assert_eq!(detail, "input \"image\" is FP64; model \"cnn\" takes FP32");

        let (_, detail) = refused(check_inputs("cnn", &declared, &item(&[("image", "FP32", &[3, 32, 32])])));
        assert!(detail.starts_with("input \"image\" has shape [3, 32, 32]; model \"cnn\" takes [-1, 3, 32, 32]"));
        let (_, detail) = refused(check_inputs("cnn", &declared, &item(&[("image", "FP32", &[1, 3, 32, 31])])));
        assert!(detail.contains("has shape [1, 3, 32, 31]"), "{detail}");

        let (field, detail) = refused(check_inputs("cnn", &declared, &item(&[("image", "FP32", &[1, 3, 32, 32])])));
        assert_eq!(field, "inputs");
        assert_eq!(detail, "model \"cnn\" needs input \"scale\" (FP32 [1])");

        // A model that declares nothing takes anything.
        assert!(check_inputs("echo", &[], &item(&[("x", "BYTES", &[7])])).is_ok());
    }
}
