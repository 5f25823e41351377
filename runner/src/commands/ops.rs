//! `needle ops`: the ops recipes can use, with their params and defaults.

use needle_core::ops::{InputsSchema, OpCatalog, ParamsSchema};
use needle_ops::Registry;

use crate::cli::JsonArg;
use crate::commands::print_json;
use crate::error::{CliError, Exit};

pub fn ops(args: &JsonArg) -> Result<Exit, CliError> {
    let registry = Registry::new();
    let mut ops = registry.all();
    ops.sort_by_key(|o| o.name);
    if args.json {
        let list: Vec<serde_json::Value> = ops
            .iter()
            .map(|op| {
                let params = match &op.params {
                    ParamsSchema::Free => serde_json::Value::String("any".into()),
                    ParamsSchema::Fixed(specs) => specs
                        .iter()
                        .map(|p| {
                            serde_json::json!({
                                "name": p.name,
                                "type": p.ty.to_string(),
                                "default": p.default,
                                "required": p.default.is_none(),
                                "doc": p.doc,
                            })
                        })
                        .collect(),
                };
                let inputs = match &op.inputs {
                    InputsSchema::Free => serde_json::Value::String("any".into()),
                    InputsSchema::Fixed(specs) => specs
                        .iter()
                        .map(|i| serde_json::json!({"name": i.name, "required": i.required, "doc": i.doc}))
                        .collect(),
                };
                serde_json::json!({
                    "name": op.name,
                    "version": op.version,
                    "summary": op.summary,
                    "params": params,
                    "inputs": inputs,
                })
            })
            .collect();
        print_json(&list);
        return Ok(Exit::Success);
    }
    for op in ops {
        println!("{} (v{}): {}", op.name, op.version, op.summary);
        match &op.inputs {
            InputsSchema::Free => println!("  inputs: any names"),
            InputsSchema::Fixed(specs) => {
                for i in specs {
                    let req = if i.required { "required" } else { "optional" };
                    println!("  input {:<18} {req:<9} {}", i.name, i.doc);
                }
            }
        }
        match &op.params {
            ParamsSchema::Free => {
                println!(
                    "  params: any names and values (reach the command as NEEDLE_PARAM_<NAME>)"
                )
            }
            ParamsSchema::Fixed(specs) => {
                for p in specs {
                    let default = p
                        .default
                        .as_ref()
                        .map(|d| format!("= {}", needle_core::canonical::to_string(d)))
                        .unwrap_or_else(|| "(required)".into());
                    println!(
                        "  param {:<18} {:<12} {default:<14} {}",
                        p.name,
                        p.ty.to_string(),
                        p.doc
                    );
                }
            }
        }
        println!();
    }
    Ok(Exit::Success)
}
