//! What the recipe tests share: a catalog with `exec` and a fake typed op.

use needle_core::ops::{
    InputSpec, InputsSchema, OpKind, OpSchema, ParamSpec, ParamType, ParamsSchema, exec_schema,
};
use serde_json::json;

/// `exec`, and `train`: `steps` (int, required), `lr` (float, 0.001), `arch` ("a" | "b", "a");
/// one required input, `data`.
pub fn catalog() -> Vec<OpSchema> {
    vec![
        exec_schema(),
        OpSchema {
            name: "train",
            version: 3,
            summary: "a fake typed op",
            kind: OpKind::Builtin,
            params: ParamsSchema::Fixed(vec![
                ParamSpec {
                    name: "steps",
                    ty: ParamType::Int,
                    default: None,
                    doc: "optimizer steps",
                },
                ParamSpec {
                    name: "lr",
                    ty: ParamType::Float,
                    default: Some(json!(0.001)),
                    doc: "learning rate",
                },
                ParamSpec {
                    name: "arch",
                    ty: ParamType::Choice(&["a", "b"]),
                    default: Some(json!("a")),
                    doc: "architecture",
                },
            ]),
            inputs: InputsSchema::Fixed(vec![InputSpec {
                name: "data",
                required: true,
                doc: "training data",
            }]),
        },
    ]
}
