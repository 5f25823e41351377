//! A step's `resources`, `retries` and `timeout`: numbers, counts, GPU shares and durations.

use super::*;

impl Parser<'_> {
    pub(super) fn resources(
        &mut self,
        v: &Node<'_>,
        spans: &mut BTreeMap<String, Range<usize>>,
    ) -> Resources {
        let mut res = Resources::default();
        if !self.no_vars("resources", v) {
            return res;
        }
        let Some(t) = self.table(v, "`resources`") else {
            return res;
        };
        // Read apart, then combined: `gpus` and `gpu_mem_gb` mean something together.
        let mut gpus = None;
        let mut gpu_mem_gb = None;
        for (k, rv) in t.iter() {
            let key = key_str(k);
            if RESOURCE_KEYS.contains(&key) {
                spans.insert(key.to_string(), rv.span());
            }
            match key {
                "gpus" => gpus = self.gpus(rv),
                "gpu_mem_gb" => {
                    gpu_mem_gb = self.number(
                        "resources.gpu_mem_gb",
                        rv,
                        |x| x > 0.0,
                        "a positive number of GB",
                    )
                }
                "cpus" => res.cpus = self.count(&format!("resources.{key}"), rv).unwrap_or(1),
                "mem_gb" => {
                    if let Some(gb) = self.number(
                        "resources.mem_gb",
                        rv,
                        |x| x >= 0.0,
                        "a non-negative number",
                    ) {
                        res.mem_gb = gb;
                    }
                }
                _ => {
                    let help =
                        did_you_mean(key, RESOURCE_KEYS.iter().copied()).unwrap_or_else(|| {
                            format!(
                                "resources are {}",
                                backticked(RESOURCE_KEYS.iter().copied())
                            )
                        });
                    self.error_help(k.span(), format!("unknown resource `{key}`"), Some(help));
                }
            }
        }
        res.gpus = match (gpus, gpu_mem_gb) {
            (None | Some(Gpus::Whole(0)), None) => GpuRequest::None,
            (Some(Gpus::Whole(0)), Some(_)) => {
                self.error_help(
                    spans["gpu_mem_gb"].clone(),
                    "`resources.gpu_mem_gb` asks for GPU memory, but this step asks for no GPU (`gpus = 0`)".to_string(),
                    Some("leave `gpus` out, or ask for a share such as `gpus = 0.5`".to_string()),
                );
                GpuRequest::None
            }
            (Some(Gpus::Whole(count)), mem_gb) => GpuRequest::Whole { count, mem_gb },
            (Some(Gpus::Share(share)), mem_gb) => GpuRequest::Part {
                share: Some(share),
                mem_gb,
            },
            (None, Some(mem_gb)) => GpuRequest::Part {
                share: None,
                mem_gb: Some(mem_gb),
            },
        };
        res
    }

    /// `resources.gpus`: a whole count (0, 1, 2…) or a share of one GPU in (0, 1).
    pub(super) fn gpus(&mut self, v: &Node<'_>) -> Option<Gpus> {
        let x = match v.get_ref() {
            DeValue::Integer(_) | DeValue::Float(_) => self.value(v).and_then(|x| x.as_f64()),
            _ => None,
        };
        let help = "a step holds whole GPUs alone (`gpus = 2`) or shares one GPU (`gpus = 0.25`: \
                    up to four such steps on a GPU at once); a share never spans two GPUs";
        match x {
            Some(x) if x > 0.0 && x < 1.0 => Some(Gpus::Share(x)),
            Some(x) if x >= 1.0 && x.fract() == 0.0 && x <= u32::MAX as f64 => {
                Some(Gpus::Whole(x as u32))
            }
            // An integer 0 is "no GPU"; a share of nothing is a mistake.
            Some(x) if x == 0.0 && matches!(v.get_ref(), DeValue::Integer(_)) => {
                Some(Gpus::Whole(0))
            }
            Some(0.0) => {
                self.error_help(
                    v.span(),
                    format!(
                        "`resources.gpus` = {}: a share of a GPU must be above 0",
                        describe(v)
                    ),
                    Some("leave `gpus` out (or write `gpus = 0`) for a step without GPU".into()),
                );
                None
            }
            _ => {
                self.error_help(
                    v.span(),
                    format!(
                        "`resources.gpus` must be a whole count (0, 1, 2…) or a share of one GPU in (0, 1), found {}",
                        describe(v)
                    ),
                    Some(help.into()),
                );
                None
            }
        }
    }

    /// A finite number (integer or float) that passes `ok`.
    pub(super) fn number(
        &mut self,
        what: &str,
        v: &Node<'_>,
        ok: impl Fn(f64) -> bool,
        expected: &str,
    ) -> Option<f64> {
        let x = match v.get_ref() {
            DeValue::Integer(_) | DeValue::Float(_) => self
                .value(v)
                .and_then(|x| x.as_f64())
                .filter(|x| x.is_finite() && ok(*x)),
            _ => None,
        };
        if x.is_none() {
            self.error(
                v.span(),
                format!("`{what}` must be {expected}, found {}", describe(v)),
            );
        }
        x
    }

    /// A non-negative integer that fits a `u32`.
    pub(super) fn count(&mut self, what: &str, v: &Node<'_>) -> Option<u32> {
        let n = match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .and_then(|n| u32::try_from(n).ok()),
            _ => None,
        };
        if n.is_none() {
            self.error(
                v.span(),
                format!(
                    "`{what}` must be a non-negative integer, found {}",
                    describe(v)
                ),
            );
        }
        n
    }

    pub(super) fn retries(&mut self, v: &Node<'_>) -> RetryPolicy {
        let mut policy = RetryPolicy::default();
        if !self.no_vars("retries", v) {
            return policy;
        }
        match v.get_ref() {
            DeValue::Integer(_) => policy.count = self.count("retries", v).unwrap_or(0),
            DeValue::Table(t) => {
                let mut has_count = false;
                for (k, rv) in t.iter() {
                    match key_str(k) {
                        "count" => {
                            has_count = true;
                            policy.count = self.count("retries.count", rv).unwrap_or(0);
                        }
                        "backoff" => {
                            if let Some(d) = self.duration("retries.backoff", rv) {
                                policy.backoff = d;
                            }
                        }
                        other => {
                            let help = did_you_mean(other, RETRY_KEYS.iter().copied())
                                .unwrap_or_else(|| "`retries` has `count` and `backoff`".into());
                            self.error_help(
                                k.span(),
                                format!("unknown key `{other}` in `retries`"),
                                Some(help),
                            );
                        }
                    }
                }
                if !has_count {
                    self.error(v.span(), "`retries` has no `count`");
                }
            }
            _ => self.error_help(
                v.span(),
                format!(
                    "`retries` must be an integer or a table, found {}",
                    describe(v)
                ),
                Some("write `retries = 2` or `retries = { count = 2, backoff = \"30s\" }`".into()),
            ),
        }
        policy
    }

    /// A duration as a humantime string (`"10m"`, `"1h 30m"`) or whole seconds; positive.
    pub(super) fn duration(&mut self, what: &str, v: &Node<'_>) -> Option<Duration> {
        if !self.no_vars(what.split('.').next().unwrap_or(what), v) {
            return None;
        }
        let help = Some(
            "write a duration such as `\"90s\"`, `\"10m\"` or `\"1h 30m\"`, or whole seconds"
                .to_string(),
        );
        let d = match v.get_ref() {
            DeValue::String(s) => match humantime::parse_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    self.error_help(
                        v.span(),
                        format!("`{what}` is not a duration: `{s}` ({e})"),
                        help,
                    );
                    return None;
                }
            },
            DeValue::Integer(i) => match u64::from_str_radix(i.as_str(), i.radix()) {
                Ok(secs) => Duration::from_secs(secs),
                Err(_) => {
                    self.error(
                        v.span(),
                        format!("`{what}` must not be negative, found `{i}`"),
                    );
                    return None;
                }
            },
            _ => {
                self.error_help(
                    v.span(),
                    format!("`{what}` must be a duration, found {}", describe(v)),
                    help,
                );
                return None;
            }
        };
        if what == "timeout" && d.is_zero() {
            self.error(v.span(), "`timeout` must be positive");
            return None;
        }
        Some(d)
    }
}
