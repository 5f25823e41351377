//! `[steps.NAME]`: each step on its own: keys, op, params against the op's schema, templates,
//! `cmd`, `environment`, `code`, inputs.

use super::*;

impl<'a> Parser<'a> {
    pub(super) fn steps_table(&mut self, v: Option<&Node<'_>>) -> Vec<Draft> {
        let Some(v) = v else {
            self.errors.push(
                RecipeDiagnostic::whole("recipe has no steps")
                    .with_help("add a step: a `[steps.NAME]` table with an `op`"),
            );
            return Vec::new();
        };
        let Some(t) = self.table(v, "`steps`") else {
            return Vec::new();
        };
        if t.is_empty() {
            self.error_help(
                v.span(),
                "recipe has no steps",
                Some("add a step: a `[steps.NAME]` table with an `op`".into()),
            );
        }
        let mut drafts = Vec::new();
        for (k, val) in t.iter() {
            if let Some(d) = self.step(k, val) {
                drafts.push(d);
            }
        }
        drafts
    }

    pub(super) fn step(&mut self, k: &Key<'_>, v: &Node<'_>) -> Option<Draft> {
        let name = key_str(k);
        if !is_step_name(name) {
            let message = if name.is_empty() {
                "empty step name".to_string()
            } else {
                format!("invalid step name `{name}`")
            };
            self.error_help(
                k.span(),
                message,
                Some("step names are ASCII letters, digits, `_` and `-`".into()),
            );
        }
        let t = self.table(v, &format!("step `{name}`"))?;
        // `[steps.x]` spans its header; an inline `x = { ... }` is pointed at by its key.
        let (vs, ks) = (v.span(), k.span());
        let span = if vs.start <= ks.start && ks.end <= vs.end {
            vs
        } else {
            ks
        };

        let fields = self.known_keys(t, STEP_KEYS, &format!("step `{name}`"), "a step has");

        let mut draft = Draft {
            def: StepDef {
                name: name.to_string(),
                op: String::new(),
                op_version: 0,
                kind: OpKind::Exec,
                path_params: Vec::new(),
                inputs: BTreeMap::new(),
                params: BTreeMap::new(),
                cmd: None,
                code: Vec::new(),
                environment: Vec::new(),
                resources: Resources::default(),
                retries: RetryPolicy::default(),
                timeout: None,
                vars_used: BTreeSet::new(),
                span: span.clone(),
                param_spans: BTreeMap::new(),
                resource_spans: BTreeMap::new(),
            },
            refs: Vec::new(),
            input_spans: BTreeMap::new(),
        };

        let schema = self.op(name, &span, fields.get("op").copied());
        if let Some(schema) = schema {
            draft.def.op = schema.name.to_string();
            draft.def.op_version = schema.version;
            draft.def.kind = schema.kind;
            draft.def.path_params = schema.path_params().into_iter().map(String::from).collect();
        }
        let is_exec = schema.map(|s| s.kind == OpKind::Exec);

        // cmd and code: exec only.
        for field in ["cmd", "code"] {
            if let (Some((fk, _)), Some(false)) = (fields.get(field), is_exec) {
                let op = &draft.def.op;
                self.error_help(
                    fk.span(),
                    format!("`{field}` is only for `exec` steps, and step `{name}` has op `{op}`"),
                    Some(format!("op `{op}` takes its settings as `params`")),
                );
            }
        }
        if let Some((_, cv)) = fields.get("cmd") {
            draft.def.cmd = self.cmd(cv, &mut draft.refs);
        } else if is_exec == Some(true) {
            self.error_help(
                span.clone(),
                format!("step `{name}` runs `exec` but has no `cmd`"),
                Some("give the command as a list: `cmd = [\"python3\", \"run.py\"]`".into()),
            );
        }
        if let Some((_, cv)) = fields.get("code") {
            draft.def.code = self.code(cv);
        }
        if let Some((_, ev)) = fields.get("environment") {
            draft.def.environment = self.environment(ev);
        }

        if let Some((_, pv)) = fields.get("params") {
            self.params(name, &span, schema, pv, &mut draft);
        } else {
            self.params_missing(&span, schema, &mut draft.def);
        }
        if let Some((_, iv)) = fields.get("inputs") {
            self.inputs(name, iv, &mut draft);
        }
        if let Some(schema) = schema {
            self.required_inputs(&span, schema, &draft.def);
        }
        if is_exec == Some(true) {
            self.env_collisions(name, "params", "NEEDLE_PARAM_", &draft.def.param_spans);
            self.env_collisions(name, "inputs", "NEEDLE_IN_", &draft.input_spans);
        }
        if let Some((_, rv)) = fields.get("resources") {
            draft.def.resources = self.resources(rv, &mut draft.def.resource_spans);
        }
        if let Some((_, rv)) = fields.get("retries") {
            draft.def.retries = self.retries(rv);
        }
        if let Some((_, tv)) = fields.get("timeout") {
            draft.def.timeout = self.duration("timeout", tv);
        }
        draft.def.vars_used = draft.refs.iter().map(|(n, _)| n.clone()).collect();
        Some(draft)
    }

    /// Two names of an `exec` step's params (or inputs) that reach its command as one
    /// environment variable: one would silently hide the other.
    pub(super) fn env_collisions(
        &mut self,
        step: &str,
        what: &str,
        prefix: &str,
        spans: &BTreeMap<String, Range<usize>>,
    ) {
        let mut by_env: HashMap<String, &str> = HashMap::new();
        let mut named: Vec<(&String, &Range<usize>)> = spans.iter().collect();
        named.sort_by_key(|(_, span)| span.start);
        for (name, span) in named {
            let env = format!("{prefix}{}", crate::ops::env_name(name));
            if let Some(first) = by_env.get(env.as_str()) {
                self.error_help(
                    span.clone(),
                    format!(
                        "{what} `{first}` and `{name}` of step `{step}` both reach the command as `{env}`"
                    ),
                    Some("rename one of them".into()),
                );
            } else {
                by_env.insert(env, name);
            }
        }
    }

    /// Report any var reference in a field that takes none. True when the value is clean.
    pub(super) fn no_vars(&mut self, field: &str, v: &Node<'_>) -> bool {
        let mut all = Vec::new();
        strings(v, &mut all);
        let mut clean = true;
        for (s, span) in all {
            if template_vars(s).map(|r| !r.is_empty()).unwrap_or(true) {
                self.error(span, format!("vars are not allowed in `{field}`"));
                clean = false;
            }
        }
        clean
    }

    /// The span of a `${var}` inside the string `s` written at `span`: exact when the string
    /// is written as it reads (no escapes, one line), else the whole string.
    pub(super) fn ref_span(
        &self,
        s: &str,
        span: &Range<usize>,
        within: &Range<usize>,
    ) -> Range<usize> {
        match self.source.text.get(span.clone()) {
            Some(raw) if raw.len() == s.len() + 2 && &raw[1..raw.len() - 1] == s => {
                span.start + 1 + within.start..span.start + 1 + within.end
            }
            _ => span.clone(),
        }
    }

    /// Check the templates of every string in `v`, collecting their references.
    pub(super) fn templates(
        &mut self,
        v: &Node<'_>,
        refs: &mut Vec<(String, Range<usize>)>,
    ) -> bool {
        let mut all = Vec::new();
        strings(v, &mut all);
        let mut ok = true;
        for (s, span) in all {
            match super::template::check(s) {
                Ok(found) => {
                    for r in found {
                        let at = self.ref_span(s, &span, &r.range);
                        refs.push((r.name, at));
                    }
                }
                Err(e) => {
                    self.error_help(span, e.message, e.help.map(str::to_string));
                    ok = false;
                }
            }
        }
        ok
    }

    pub(super) fn op(
        &mut self,
        step: &str,
        step_span: &Range<usize>,
        field: Option<(&Key<'_>, &Node<'_>)>,
    ) -> Option<&'a OpSchema> {
        let catalog = self.catalog;
        let mut known: Vec<&str> = catalog.all().iter().map(|op| op.name).collect();
        known.sort_unstable();
        let Some((_, v)) = field else {
            self.error_help(
                step_span.clone(),
                format!("step `{step}` has no `op`"),
                Some(format!("known ops: {}", backticked(known.iter().copied()))),
            );
            return None;
        };
        if !self.no_vars("op", v) {
            return None;
        }
        let DeValue::String(op) = v.get_ref() else {
            self.error(
                v.span(),
                format!("`op` must be a string, found {}", describe(v)),
            );
            return None;
        };
        match catalog.get(op) {
            Some(schema) => Some(schema),
            None => {
                let list = format!("known ops: {}", backticked(known.iter().copied()));
                let help = match did_you_mean(op, known.iter().copied()) {
                    Some(hint) => format!("{hint} {list}"),
                    None => list,
                };
                self.error_help(v.span(), format!("unknown op `{op}`"), Some(help));
                None
            }
        }
    }

    pub(super) fn cmd(
        &mut self,
        v: &Node<'_>,
        refs: &mut Vec<(String, Range<usize>)>,
    ) -> Option<Vec<Value>> {
        let help = Some(
            "write the argv as a list of strings, e.g. `cmd = [\"python3\", \"gen.py\"]`; no shell runs it"
                .to_string(),
        );
        let items = match v.get_ref() {
            DeValue::Array(items) if items.is_empty() => {
                self.error_help(v.span(), "`cmd` is empty", help);
                return None;
            }
            DeValue::Array(items) => items,
            _ => {
                self.error_help(
                    v.span(),
                    format!("`cmd` must be a list of strings, found {}", describe(v)),
                    help,
                );
                return None;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) if s.contains('\0') => {
                    self.error(
                        item.span(),
                        "`cmd` argument holds a NUL character, which no command can receive",
                    );
                    ok = false;
                }
                DeValue::String(s) => {
                    ok &= self.templates(item, refs);
                    out.push(Value::String(s.to_string()));
                }
                _ => {
                    self.error_help(
                        item.span(),
                        format!("`cmd` items must be strings, found {}", describe(item)),
                        Some("quote it: every argument reaches the command as text".into()),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// `environment = ["python3 -V", "python3 -m pip freeze"]`: commands, each a string split
    /// at whitespace into an argv (no shell), run when the recipe is planned.
    pub(super) fn environment(&mut self, v: &Node<'_>) -> Vec<String> {
        if !self.no_vars("environment", v) {
            return Vec::new();
        }
        let DeValue::Array(items) = v.get_ref() else {
            self.error_help(
                v.span(),
                format!(
                    "`environment` must be a list of commands, found {}",
                    describe(v)
                ),
                Some("e.g. `environment = [\"python3 -V\", \"python3 -m pip freeze\"]`".into()),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(c) if !c.trim().is_empty() && !c.contains('\0') => {
                    let command = c.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !out.contains(&command) {
                        out.push(command);
                    }
                }
                _ => self.error(
                    item.span(),
                    format!(
                        "`environment` commands must be non-empty strings, found {}",
                        describe(item)
                    ),
                ),
            }
        }
        out
    }

    pub(super) fn code(&mut self, v: &Node<'_>) -> Vec<String> {
        if !self.no_vars("code", v) {
            return Vec::new();
        }
        let DeValue::Array(items) = v.get_ref() else {
            self.error(
                v.span(),
                format!("`code` must be a list of paths, found {}", describe(v)),
            );
            return Vec::new();
        };
        let mut out: Vec<String> = Vec::new();
        for item in items.iter() {
            let DeValue::String(raw) = item.get_ref() else {
                self.error(
                    item.span(),
                    format!("`code` paths must be strings, found {}", describe(item)),
                );
                continue;
            };
            let path = match normalise_code_path(raw) {
                Err(message) => {
                    self.error(item.span(), message);
                    continue;
                }
                Ok(path) => path,
            };
            // Walked here, so that what planning would trip on is reported at this line.
            match code_files(&self.source.dir, &path) {
                Ok(files) if code_bytes(&files) > CODE_LIMIT => self.error_help(
                    item.span(),
                    format!(
                        "code path `{raw}` holds {} in {} files: code is hashed at every plan \
                         and copied into every attempt's working directory",
                        crate::store::human_bytes(code_bytes(&files)),
                        files.len()
                    ),
                    Some(
                        "leave data out of `code` (a `.needleignore`, gitignore syntax, leaves \
                         files out of a directory): import it with a `files` step, whose output \
                         is an input like any other, or hand a built-in op its `path`"
                            .into(),
                    ),
                ),
                Ok(_) if !out.contains(&path) => out.push(path),
                Ok(_) => {}
                Err(CodeError::Missing { path: missing }) if missing == path => self.error_help(
                    item.span(),
                    format!("code path `{raw}` does not exist"),
                    Some("code paths are relative to the directory holding the recipe".into()),
                ),
                Err(e @ (CodeError::Outside { .. } | CodeError::Missing { .. })) => self
                    .error_help(
                        item.span(),
                        format!("code path `{raw}`: {e}"),
                        Some("a step's code must lie inside the directory holding the recipe; copy it there".into()),
                    ),
                Err(e @ CodeError::Loop { .. }) => self.error_help(
                    item.span(),
                    format!("code path `{raw}`: {e}"),
                    Some("remove the link, or name the files inside it".into()),
                ),
                Err(e @ CodeError::Special { .. }) => self.error_help(
                    item.span(),
                    format!("code path `{raw}`: {e}"),
                    Some("code is regular files and directories: a FIFO or a device could block the hashing".into()),
                ),
                Err(e @ CodeError::NotUtf8 { .. }) => {
                    self.error(item.span(), format!("code path `{raw}`: {e}"))
                }
                Err(e @ CodeError::Io { .. }) => {
                    let cause = std::error::Error::source(&e).map(|c| c.to_string());
                    let mut message = format!("code path `{raw}`: {e}");
                    if let Some(cause) = cause {
                        message.push_str(&format!(": {cause}"));
                    }
                    self.error(item.span(), message)
                }
            }
        }
        out
    }

    pub(super) fn params(
        &mut self,
        step: &str,
        step_span: &Range<usize>,
        schema: Option<&OpSchema>,
        v: &Node<'_>,
        draft: &mut Draft,
    ) {
        let Some(t) = self.table(v, "`params`") else {
            return;
        };
        for (k, pv) in t.iter() {
            let pname = key_str(k);
            draft.def.param_spans.insert(pname.to_string(), pv.span());
            let templates_ok = self.templates(pv, &mut draft.refs);
            let Some(value) = self.value(pv) else {
                continue;
            };
            if let Some(OpSchema {
                name: op,
                params: ParamsSchema::Fixed(specs),
                ..
            }) = schema
            {
                let Some(spec) = specs.iter().find(|s| s.name == pname) else {
                    let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
                    let list = if names.is_empty() {
                        format!("op `{op}` takes no params")
                    } else {
                        format!("op `{op}` takes {}", backticked(names.iter().copied()))
                    };
                    let help = match did_you_mean(pname, names.iter().copied()) {
                        Some(hint) => format!("{hint} {list}"),
                        None => list,
                    };
                    self.error_help(
                        k.span(),
                        format!("unknown param `{pname}` for op `{op}` in step `{step}`"),
                        Some(help),
                    );
                    continue;
                };
                if templates_ok
                    && !has_refs(&value)
                    && let Err(m) = spec.ty.check(&value)
                {
                    self.error(
                        pv.span(),
                        format!(
                            "param `{pname}` of op `{op}` expects {}, found {}",
                            m.expected, m.found
                        ),
                    );
                }
            }
            draft.def.params.insert(pname.to_string(), value);
        }
        self.params_missing(step_span, schema, &mut draft.def);
    }

    /// Fill in the defaults of absent params; report absent params that have none.
    pub(super) fn params_missing(
        &mut self,
        step_span: &Range<usize>,
        schema: Option<&OpSchema>,
        def: &mut StepDef,
    ) {
        let Some(OpSchema {
            name: op,
            params: ParamsSchema::Fixed(specs),
            ..
        }) = schema
        else {
            return;
        };
        for spec in specs {
            if def.params.contains_key(spec.name) || def.param_spans.contains_key(spec.name) {
                continue;
            }
            match &spec.default {
                Some(d) => {
                    def.params.insert(spec.name.to_string(), d.clone());
                }
                None => self.error_help(
                    step_span.clone(),
                    format!("missing param `{}` ({}) for op `{op}`", spec.name, spec.ty),
                    (!spec.doc.is_empty()).then(|| format!("`{}`: {}", spec.name, spec.doc)),
                ),
            }
        }
    }

    pub(super) fn inputs(&mut self, step: &str, v: &Node<'_>, draft: &mut Draft) {
        if !self.no_vars("inputs", v) {
            return;
        }
        let Some(t) = self.table(v, "`inputs`") else {
            return;
        };
        let schema = self.catalog.get(&draft.def.op);
        for (k, iv) in t.iter() {
            let iname = key_str(k);
            if let Some(OpSchema {
                name: op,
                inputs: InputsSchema::Fixed(specs),
                ..
            }) = schema
                && !specs.iter().any(|s| s.name == iname)
            {
                let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
                let list = if names.is_empty() {
                    format!("op `{op}` takes no inputs")
                } else {
                    format!("op `{op}` takes {}", backticked(names.iter().copied()))
                };
                let help = match did_you_mean(iname, names.iter().copied()) {
                    Some(hint) => format!("{hint} {list}"),
                    None => list,
                };
                self.error_help(
                    k.span(),
                    format!("unknown input `{iname}` for op `{op}` in step `{step}`"),
                    Some(help),
                );
                continue;
            }
            let DeValue::String(target) = iv.get_ref() else {
                self.error_help(
                    iv.span(),
                    format!("input `{iname}` must name a step, found {}", describe(iv)),
                    Some(
                        "write `\"step\"`, or `\"step[*]\"` to gather every instance of a step"
                            .into(),
                    ),
                );
                continue;
            };
            let (target_step, gather) = match target.strip_suffix("[*]") {
                Some(s) => (s, true),
                None => (target.as_ref(), false),
            };
            if !is_step_name(target_step) {
                self.error_help(
                    iv.span(),
                    format!("input `{iname}` must name a step, found `{target}`"),
                    Some(
                        "write `\"step\"`, or `\"step[*]\"` to gather every instance of a step"
                            .into(),
                    ),
                );
                continue;
            }
            draft.input_spans.insert(iname.to_string(), iv.span());
            draft.def.inputs.insert(
                iname.to_string(),
                InputRef {
                    step: target_step.to_string(),
                    gather,
                },
            );
        }
    }

    pub(super) fn required_inputs(
        &mut self,
        step_span: &Range<usize>,
        schema: &OpSchema,
        def: &StepDef,
    ) {
        let InputsSchema::Fixed(specs) = &schema.inputs else {
            return;
        };
        for spec in specs {
            if spec.required && !def.inputs.contains_key(spec.name) {
                self.error_help(
                    step_span.clone(),
                    format!("missing input `{}` for op `{}`", spec.name, schema.name),
                    (!spec.doc.is_empty()).then(|| format!("`{}`: {}", spec.name, spec.doc)),
                );
            }
        }
    }
}

/// `a/./b/../c` → `a/c`; reject absolute paths and paths that leave the recipe directory.
pub(super) fn normalise_code_path(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("empty code path".to_string());
    }
    if raw.starts_with('/') || raw.starts_with('\\') || Path::new(raw).is_absolute() {
        return Err(format!(
            "code path `{raw}` is absolute; code paths are relative to the recipe directory"
        ));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in raw.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("code path `{raw}` leaves the recipe directory"));
                }
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        Ok(".".to_string())
    } else {
        Ok(parts.join("/"))
    }
}
